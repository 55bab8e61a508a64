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
    /// The token does not belong to the application.
    #[error("{0}")]
    PermissionDenied(String),
    /// The application exists and the caller did not prove it owns it.
    #[error("{0}")]
    AlreadyExists(String),
    /// A server-wide limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
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
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
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
