//! The core's errors. Messages follow runc's where a client may match on them; causes are kept
//! as sources, and an agent's RPC status (with its code) inside [`AgentError`].

use std::path::PathBuf;

use crate::agent::AgentError;

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
    /// The bundle is unusable as given (a check failed, not a read).
    #[error("bundle: {0}")]
    Bundle(String),
    /// A bundle file or directory could not be read.
    #[error("bundle: {what} {}: {source}", path.display())]
    BundleFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle: {}: invalid OCI spec: {source}", path.display())]
    BundleSpec {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("namespace {kind} path {}: {reason}", path.display())]
    Namespace { kind: String, path: PathBuf, reason: String },
    #[error("{kind} hook {}: {reason}", path.display())]
    Hook { kind: &'static str, path: PathBuf, reason: String },
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
    Agent(#[from] AgentError),
    #[error("pod network: {0}")]
    Network(#[from] crate::network::NetError),
    /// A CNI network (`husk run`): its configs, port mappings or plugins.
    #[error(transparent)]
    Cni(#[from] crate::cni::CniError),
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

    pub fn bundle_file(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::BundleFile { what, path, source }
    }

    /// The agent's RPC status code, when the error is one.
    pub fn rpc_code(&self) -> Option<tonic::Code> {
        match self {
            RuntimeError::Agent(a) => a.code(),
            _ => None,
        }
    }
}
