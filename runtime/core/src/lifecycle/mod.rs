//! Container lifecycle over the state directory and the sandbox VMs: what every front end (OCI
//! CLI, `husk run`, later the shim) calls to create, start, signal, exec into and delete
//! containers. One file per operation; the VMs and their agents are reached through
//! [`Vms`](crate::vm::Vms), so every step is unit-tested against a fake.

mod control;
mod create;
mod delete;
mod exec;
/// VM sizing from a bundle; public for the fuzz targets (runtime/fuzz).
pub mod shape;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use crate::agent::{Agent, Status};
use crate::config::Config;
use crate::error::RuntimeError;
use crate::relay::{GuestStreams, Target};
use crate::state::{ContainerRecord, Lock, StateDir};
use crate::stdio::StdioStrategy;
use crate::vm::{Calls, ExtraShare, VmProcess, Vms};

pub use create::now_rfc3339;
pub use exec::ExecOpts;

/// The OCI version husk reports in state.
pub const OCI_VERSION: &str = "1.0.2-dev";

/// Options of a create that do not come from the bundle.
#[derive(Debug, Clone)]
pub struct CreateOpts {
    pub stdio: StdioStrategy,
    /// Extra VM shares (only when this container starts the VM).
    pub extra_shares: Vec<ExtraShare>,
    /// Where the rootfs comes from, when not the bundle's: (share tag, path in the share).
    pub rootfs_share: Option<(String, String)>,
    pub memory_mib: Option<u32>,
    pub vcpus: Option<u32>,
    /// The caller reports guest PIDs to its clients (a shim), so pod peers' namespace paths
    /// name those.
    pub clients_see_guest_pids: bool,
    /// The process gets an input stream; without one its stdin is /dev/null in the guest, as
    /// for `docker run` without `-i` (one guest connection fewer).
    pub stdin: bool,
    /// The caller starts the process right after the create (`run`): with
    /// [`StdioStrategy::Held`] and no host hook to run between the two (prestart,
    /// createRuntime), the agent starts it as part of the create, one request instead of two.
    /// [`Held::started`] says whether it did; the caller then calls
    /// [`Runtime::started`] instead of [`Runtime::start`].
    pub start: bool,
}

impl CreateOpts {
    pub fn new(stdio: StdioStrategy) -> Self {
        Self {
            stdio,
            extra_shares: Vec::new(),
            rootfs_share: None,
            memory_mib: None,
            vcpus: None,
            clients_see_guest_pids: false,
            stdin: true,
            start: false,
        }
    }
}

/// A created process whose streams the caller holds ([`StdioStrategy::Held`]).
#[derive(Debug)]
pub struct Held {
    pub target: Target,
    /// The process's PID in the guest.
    pub guest_pid: u32,
    pub guest: GuestStreams,
    /// The VMM when this call started it, so the caller reaps it after the last delete.
    pub vm: VmProcess,
    /// The process runs already: an exec's always does, a create's when the create started it
    /// too ([`CreateOpts::start`]).
    pub started: bool,
}

/// The lifecycle over one state directory.
#[derive(Debug)]
pub struct Runtime<V: Vms> {
    pub state: StateDir,
    pub cfg: Config,
    pub vms: V,
}

impl<V: Vms> Runtime<V> {
    pub fn new(state: StateDir, cfg: Config, vms: V) -> Self {
        Self { state, cfg, vms }
    }

    /// The container's status as its VM sees it; stopped when the VM (or the container in it)
    /// is gone or cannot be reached.
    pub async fn status(&self, rec: &ContainerRecord) -> Result<(Status, Option<V::Agent>), RuntimeError> {
        let Some(agent) = self.vm_agent(rec).await else {
            return Ok((Status::Stopped, None));
        };
        let status = agent.container_status(&rec.id).await?.unwrap_or(Status::Stopped);
        Ok((status, Some(agent)))
    }

    /// The agent of the container's VM; None when the VM is gone or does not answer (its
    /// containers count as stopped).
    pub(crate) async fn vm_agent(&self, rec: &ContainerRecord) -> Option<V::Agent> {
        let srec = self.state.read_sandbox(&rec.sandbox_id).ok().flatten()?;
        if !self.vms.alive(&srec) {
            return None;
        }
        match self.vms.connect(&srec, Calls::Bounded).await {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!("container {}: {e}", rec.id);
                None
            }
        }
    }

    /// Locks `id` and connects to its VM, requiring one of `allowed` states.
    async fn locked_live(
        &self,
        id: &str,
        what: &str,
        allowed: &[Status],
    ) -> Result<(Lock, ContainerRecord, V::Agent, Status), RuntimeError> {
        let (lock, rec) = self.state.lock_container_async(id).await?;
        let (status, agent) = self.status(&rec).await?;
        match agent {
            Some(a) if allowed.contains(&status) => Ok((lock, rec, a, status)),
            _ => Err(RuntimeError::WrongState(match status {
                Status::Stopped => format!("cannot {what} container {id}: container not running"),
                s => format!("cannot {what} container {id}: it is {}", s.as_str()),
            })),
        }
    }

    /// A sandbox's VM share directory (for callers that place files in it).
    pub fn shared_dir(&self, sid: &str) -> PathBuf {
        crate::share::shared_dir(&self.state, sid)
    }
}
