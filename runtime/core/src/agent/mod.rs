//! The agent API as the lifecycle sees it: typed calls behind a trait, so the lifecycle runs
//! against the real agent in a VM ([`client::GrpcAgent`]) or a fake one in unit tests.

pub mod client;
/// A fake agent and VM backend, for unit tests here and in the front ends (feature `fake`).
#[cfg(any(test, feature = "fake"))]
pub mod fake;

use std::future::Future;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use husk_proto as pb;

pub use client::{stream_name, GrpcAgent};

/// Why an agent call failed. RPC failures keep their status (and so their code).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{call}: {}", .status.message())]
    Rpc {
        call: &'static str,
        #[source]
        status: tonic::Status,
    },
    #[error("dialling {path} port {port}: {source}")]
    Dial {
        path: PathBuf,
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent did not answer on {path} within {waited:?}: {last}")]
    NotReady { path: PathBuf, waited: Duration, last: String },
    #[error("stdio stream {name}: {source}")]
    Stdio {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the agent at {path} speaks API version {agent} (husk-agent {agent_version}), this runtime \
         {runtime}: the guest initramfs does not match this husk (rebuild or reinstall both)"
    )]
    ApiVersion { path: PathBuf, agent: u32, agent_version: String, runtime: u32 },
    /// The agent answered something no agent of this API version can mean.
    #[error("{call}: the agent answered {what}")]
    Protocol { call: &'static str, what: String },
    #[error("gRPC channel: {0}")]
    Channel(#[from] tonic::transport::Error),
}

impl AgentError {
    /// The RPC status code, when the agent answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            AgentError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    pub(crate) fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> Self {
        move |status| AgentError::Rpc { call, status }
    }
}

pub type AgentResult<T> = Result<T, AgentError>;

/// What a container's status is, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }

    /// From the wire: an unknown or unspecified value is the agent's error, never "stopped".
    pub fn from_wire(v: i32) -> Result<Self, AgentError> {
        match pb::ContainerStatus::try_from(v) {
            Ok(pb::ContainerStatus::Created) => Ok(Status::Created),
            Ok(pb::ContainerStatus::Running) => Ok(Status::Running),
            Ok(pb::ContainerStatus::Paused) => Ok(Status::Paused),
            Ok(pb::ContainerStatus::Stopped) => Ok(Status::Stopped),
            Ok(pb::ContainerStatus::Unspecified) | Err(_) => {
                Err(AgentError::Protocol { call: "ListContainers", what: format!("container status {v}") })
            }
        }
    }

    pub fn to_wire(self) -> pb::ContainerStatus {
        match self {
            Status::Created => pb::ContainerStatus::Created,
            Status::Running => pb::ContainerStatus::Running,
            Status::Paused => pb::ContainerStatus::Paused,
            Status::Stopped => pb::ContainerStatus::Stopped,
        }
    }
}

/// The agent's event stream (OOM kills, exits), ended by the agent or the connection.
pub type Events = tokio::sync::mpsc::Receiver<AgentResult<pb::Event>>;

/// Every call the runtime makes to a sandbox's agent.
pub trait Agent: Clone + Send + Sync + 'static {
    fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> impl Future<Output = AgentResult<()>> + Send;
    /// Kills every container and powers the VM off.
    fn destroy_sandbox(&self) -> impl Future<Output = AgentResult<()>> + Send;
    /// Returns the init process's guest PID, and whether it was started too (`req.start`; an
    /// agent that predates the field leaves it created).
    fn create_container(
        &self,
        req: pb::CreateContainerRequest,
    ) -> impl Future<Output = AgentResult<pb::CreateContainerResponse>> + Send;
    fn start_container(&self, id: &str) -> impl Future<Output = AgentResult<()>> + Send;
    /// `None`: the agent does not know the container.
    fn container_status(&self, id: &str) -> impl Future<Output = AgentResult<Option<Status>>> + Send;
    fn remove_container(&self, id: &str, force: bool) -> impl Future<Output = AgentResult<()>> + Send;
    fn pause_container(&self, id: &str) -> impl Future<Output = AgentResult<()>> + Send;
    fn resume_container(&self, id: &str) -> impl Future<Output = AgentResult<()>> + Send;
    fn update_container(
        &self,
        id: &str,
        resources_json: Vec<u8>,
    ) -> impl Future<Output = AgentResult<()>> + Send;
    fn list_processes(&self, id: &str) -> impl Future<Output = AgentResult<Vec<pb::ProcessInfo>>> + Send;
    fn container_stats(
        &self,
        id: &str,
    ) -> impl Future<Output = AgentResult<pb::ContainerStatsResponse>> + Send;
    /// Returns the exec's guest PID.
    fn exec_process(&self, req: pb::ExecProcessRequest) -> impl Future<Output = AgentResult<u32>> + Send;
    fn signal_process(&self, req: pb::SignalProcessRequest) -> impl Future<Output = AgentResult<()>> + Send;
    fn wait_process(&self, p: pb::ProcessRef) -> impl Future<Output = AgentResult<pb::ExitStatus>> + Send;
    fn resize_tty(&self, req: pb::ResizeTtyRequest) -> impl Future<Output = AgentResult<()>> + Send;
    /// Ends the process's input now (data it has not read is dropped).
    fn close_stdin(&self, p: pb::ProcessRef) -> impl Future<Output = AgentResult<()>> + Send;
    fn subscribe(&self) -> impl Future<Output = AgentResult<Events>> + Send;
    /// Opens a stdio stream named `name` for a later create or exec request (blocking mode).
    fn open_stdio(&self, name: &str) -> impl Future<Output = AgentResult<UnixStream>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_value_is_mapped_and_unknown_ones_are_errors() {
        for s in [Status::Created, Status::Running, Status::Paused, Status::Stopped] {
            assert_eq!(Status::from_wire(s.to_wire() as i32).ok(), Some(s));
        }
        assert!(Status::from_wire(pb::ContainerStatus::Unspecified as i32).is_err());
        assert!(Status::from_wire(99).is_err());
        assert!(Status::from_wire(-1).is_err());
    }
}
