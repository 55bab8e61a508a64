//! Errors of the API, mapped to gRPC status codes in one place.

use stoker_core::{EngineError, InvalidInput};
use tonic::{Code, Status};

/// Why a request was refused. Every refusal leaves the server's state unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field failed validation.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// No such application.
    #[error("application {0} is not registered")]
    NotFound(String),
    /// The call carries no token.
    #[error("token: missing; pass the token RegisterApplication returned")]
    Unauthenticated,
    /// The caller did not prove who it is (no, bad or refused bearer token).
    #[error("{0}")]
    NotAuthenticated(String),
    /// The token does not belong to the application.
    #[error("{0}")]
    PermissionDenied(String),
    /// The application exists and the caller did not prove it owns it.
    #[error("{0}")]
    AlreadyExists(String),
    /// A configured limit refused the request.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// Try again later (the application is ending, the server is shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// The engine refused the command.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl ApiError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::Unauthenticated | Self::NotAuthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::Limit(err) => err.limit.code(),
            Self::Unavailable(_) => Code::Unavailable,
            Self::Engine(EngineError::UnknownProfile(_) | EngineError::TargetTooLarge { .. }) => {
                Code::InvalidArgument
            }
            Self::Engine(EngineError::Ending) => Code::FailedPrecondition,
            Self::Engine(EngineError::IdsExhausted(_)) => Code::ResourceExhausted,
        }
    }

    /// Shorthand for a validation error.
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Invalid(InvalidInput::new(field, problem))
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

/// A limit that `stoker serve` enforces so that no caller, anonymous or hostile, can exhaust the
/// server or the cluster. Each one has a flag, and its name labels
/// `stoker_limit_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Applications registered at once (`--max-applications`).
    Applications,
    /// Applications registered at once in one namespace (`--max-applications-per-namespace`).
    ApplicationsPerNamespace,
    /// Applications registered at once by one driver identity
    /// (`--max-applications-per-identity`, with `--auth kubernetes`).
    ApplicationsPerIdentity,
    /// The total of one resource profile (`--max-executors-per-profile`).
    ExecutorsPerProfile,
    /// The totals of one application, summed over its profiles
    /// (`--max-executors-per-application`).
    ExecutorsPerApplication,
    /// The totals of all applications together (`--max-executors`).
    Executors,
    /// Bytes of an executor pod template (`--max-pod-template-bytes`).
    PodTemplateBytes,
    /// WatchExecutors streams open at once for one application
    /// (`--max-watches-per-application`).
    WatchesPerApplication,
}

impl Limit {
    /// Every limit, for metrics that start at zero.
    pub const ALL: [Limit; 8] = [
        Self::Applications,
        Self::ApplicationsPerNamespace,
        Self::ApplicationsPerIdentity,
        Self::ExecutorsPerProfile,
        Self::ExecutorsPerApplication,
        Self::Executors,
        Self::PodTemplateBytes,
        Self::WatchesPerApplication,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Applications => "applications",
            Self::ApplicationsPerNamespace => "applications_per_namespace",
            Self::ApplicationsPerIdentity => "applications_per_identity",
            Self::ExecutorsPerProfile => "executors_per_profile",
            Self::ExecutorsPerApplication => "executors_per_application",
            Self::Executors => "executors",
            Self::PodTemplateBytes => "pod_template_bytes",
            Self::WatchesPerApplication => "watches_per_application",
        }
    }

    /// The `stoker serve` flag that sets it.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Applications => "--max-applications",
            Self::ApplicationsPerNamespace => "--max-applications-per-namespace",
            Self::ApplicationsPerIdentity => "--max-applications-per-identity",
            Self::ExecutorsPerProfile => "--max-executors-per-profile",
            Self::ExecutorsPerApplication => "--max-executors-per-application",
            Self::Executors => "--max-executors",
            Self::PodTemplateBytes => "--max-pod-template-bytes",
            Self::WatchesPerApplication => "--max-watches-per-application",
        }
    }

    /// `INVALID_ARGUMENT` when the request alone is too large whatever the server's state (a
    /// driver must change it), `RESOURCE_EXHAUSTED` when the server is full (it may succeed
    /// later).
    pub fn code(self) -> Code {
        match self {
            Self::ExecutorsPerProfile | Self::ExecutorsPerApplication | Self::PodTemplateBytes => {
                Code::InvalidArgument
            }
            Self::Applications
            | Self::ApplicationsPerNamespace
            | Self::ApplicationsPerIdentity
            | Self::Executors
            | Self::WatchesPerApplication => Code::ResourceExhausted,
        }
    }
}

/// A request refused by a [`Limit`]. The message names the field or the resource, the limit's
/// value and its flag.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct LimitError {
    /// The limit.
    pub limit: Limit,
    message: String,
}

impl LimitError {
    /// A refusal by `limit`; `message` should name its flag ([`Limit::flag`]).
    pub fn new(limit: Limit, message: impl Into<String>) -> Self {
        let message = message.into();
        debug_assert!(message.contains(limit.flag()), "{message}");
        Self { limit, message }
    }
}
