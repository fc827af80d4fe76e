//! The agent's error type and how each kind maps to a gRPC status.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The object exists but is in the wrong state for the request.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    pub fn errno(context: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> Self {
        let context = context.into();
        move |e| Self::Io { context, source: std::io::Error::from(e) }
    }
}

impl From<AgentError> for tonic::Status {
    fn from(e: AgentError) -> Self {
        let msg = e.to_string();
        match e {
            AgentError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            AgentError::NotFound(_) => tonic::Status::not_found(msg),
            AgentError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            AgentError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            AgentError::Io { .. } | AgentError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}
