//! The runtime's errors. Messages follow runc's where a client may match on them.

use crate::agent_client::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid container id {0:?}: 1-64 characters of [A-Za-z0-9_.-], not starting with '.'")]
    InvalidId(String),
    #[error("container with id exists: {0}")]
    Exists(String),
    #[error("container does not exist: {0}")]
    NotFound(String),
    #[error("{0}")]
    WrongState(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("bundle: {0}")]
    Bundle(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt state record {0}")]
    CorruptState(String),
    /// A host prerequisite is missing; the hint says what to do about it.
    #[error("{problem}\nhint: {hint}")]
    Missing { problem: String, hint: String },
    #[error("sandbox VM: {0}")]
    Vm(String),
    #[error("agent: {0}")]
    Agent(#[from] ClientError),
    #[error("agent: {}", .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("image: {0}")]
    Image(#[from] crate::image::ImageError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl RuntimeError {
    /// For `map_err`: an I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    pub fn errno(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> Self {
        let what = what.into();
        move |e| Self::Io { what, source: e.into() }
    }
}
