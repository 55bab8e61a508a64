//! Errors of the core crate.

use crate::types::{ExecutorId, ProfileId};

/// A request field that failed validation. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidInput {
    /// Path of the field, e.g. `targets[2].total`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl InvalidInput {
    /// A new validation error for `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Commands the engine refuses. Every refusal leaves the engine unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A target named a resource profile the template does not define.
    #[error("targets: resource profile {0} is not in the application's template")]
    UnknownProfile(ProfileId),
    /// A target above the configured per-application limit.
    #[error("targets: total {total} for resource profile {profile} exceeds the limit of {limit}")]
    TargetTooLarge {
        /// The profile.
        profile: ProfileId,
        /// The total asked.
        total: u64,
        /// The limit.
        limit: u32,
    },
    /// The application is ending; it takes no more commands.
    #[error("the application is ending")]
    Ending,
    /// No more executor ids: Spark parses them as `Int`.
    #[error("executor ids exhausted after {0}")]
    IdsExhausted(ExecutorId),
}
