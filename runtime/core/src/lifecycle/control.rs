//! Calls on a live container: start (then its poststart hooks), signal, pause and resume,
//! resource updates, process lists and stats.

use husk_proto as pb;

use super::{Runtime, OCI_VERSION};
use crate::agent::{Agent, Status};
use crate::error::RuntimeError;
use crate::hooks::{self, HookState};
use crate::state::ContainerRecord;
use crate::vm::Vms;

const LIVE: [Status; 3] = [Status::Created, Status::Running, Status::Paused];

/// The bundle's poststart hooks, whose failures are only logged (runc's way).
async fn poststart(id: &str, rec: &ContainerRecord) {
    let state = HookState {
        oci_version: OCI_VERSION,
        id,
        status: "running",
        pid: rec.relay_pid,
        bundle: &rec.bundle,
        annotations: &rec.annotations,
    };
    hooks::run_logged("poststart", &rec.poststart, &state).await;
}

impl<V: Vms> Runtime<V> {
    pub async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let (_lock, rec) = self.state.lock_container_async(id).await?;
        crate::timeline::mark("start: lock taken");
        let stopped = || RuntimeError::WrongState("cannot start a container that has stopped".into());
        let a = self.vm_agent(&rec).await.ok_or_else(stopped)?;
        crate::timeline::mark("start: agent reached");
        crate::fault::point("start-before-agent");
        // One request when all is well: the agent refuses to start a container that is not
        // created, and only then is its state asked for (for runc's words).
        if let Err(e) = a.start_container(id).await {
            return Err(match a.container_status(id).await {
                // Created still (the start itself failed), or no state to word it by: the
                // agent's own error.
                Ok(Some(Status::Created)) | Err(_) => e.into(),
                Ok(None | Some(Status::Stopped)) => stopped(),
                Ok(Some(s)) => {
                    RuntimeError::WrongState(format!("cannot start an already {} container", s.as_str()))
                }
            });
        }
        crate::timeline::mark("container started");
        crate::fault::point("start-after-agent");
        poststart(id, &rec).await;
        Ok(())
    }

    /// What [`Runtime::start`] does once the agent has started the process, for a create
    /// that started it ([`super::Held::started`]): the poststart hooks.
    pub async fn started(&self, id: &str) -> Result<(), RuntimeError> {
        let rec = self.state.read_container(id)?;
        crate::timeline::mark("container started");
        poststart(id, &rec).await;
        Ok(())
    }

    /// Signals the init process (or with `all` every process of the container).
    pub async fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        if !(1..=64).contains(&signal) {
            return Err(RuntimeError::InvalidArgument(format!("signal {signal} is not 1-64")));
        }
        // runc's words for a stopped container, which containerd's shim matches on.
        let not_running = || RuntimeError::WrongState("container not running".into());
        let (_lock, _rec, a, _) = self.locked_live(id, "kill", &LIVE).await.map_err(|e| match e {
            RuntimeError::WrongState(_) => not_running(),
            e => e,
        })?;
        let req = pb::SignalProcessRequest { container_id: id.into(), exec_id: String::new(), signal, all };
        a.signal_process(req).await.map_err(|e| match e.code() {
            Some(tonic::Code::FailedPrecondition) => not_running(),
            _ => e.into(),
        })
    }

    /// Signals one process of a container: its init (`exec_id` empty) or an exec.
    pub async fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), RuntimeError> {
        if exec_id.is_empty() {
            return self.kill(id, signal, all).await;
        }
        if !(1..=64).contains(&signal) {
            return Err(RuntimeError::InvalidArgument(format!("signal {signal} is not 1-64")));
        }
        let a = self.live_agent(id).await?;
        let req =
            pb::SignalProcessRequest { container_id: id.into(), exec_id: exec_id.into(), signal, all: false };
        a.signal_process(req).await.map_err(|e| match e.code() {
            Some(tonic::Code::FailedPrecondition) => {
                RuntimeError::WrongState(format!("process {exec_id} is not running"))
            }
            Some(tonic::Code::NotFound) => RuntimeError::NotFound(format!("{id}/{exec_id}")),
            _ => e.into(),
        })
    }

    /// Resizes a process's terminal.
    pub async fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<(), RuntimeError> {
        let a = self.live_agent(id).await?;
        let req = pb::ResizeTtyRequest { container_id: id.into(), exec_id: exec_id.into(), rows, cols };
        Ok(a.resize_tty(req).await?)
    }

    /// Ends a process's input.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), RuntimeError> {
        let a = self.live_agent(id).await?;
        Ok(a.close_stdin(pb::ProcessRef { container_id: id.into(), exec_id: exec_id.into() }).await?)
    }

    /// Waits for a process to end, on a connection without call timeouts; how it ended.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<crate::relay::Outcome, RuntimeError> {
        let rec = self.state.read_container(id)?;
        let srec =
            self.state.read_sandbox(&rec.sandbox_id)?.ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        let agent = self.vms.connect(&srec, crate::vm::Calls::Long).await?;
        let s =
            agent.wait_process(pb::ProcessRef { container_id: id.into(), exec_id: exec_id.into() }).await?;
        Ok(crate::relay::Outcome::from_status(&s))
    }

    /// The agent of a container's VM, without taking the container's lock (for calls on one
    /// process that must not wait behind a long lifecycle call).
    async fn live_agent(&self, id: &str) -> Result<V::Agent, RuntimeError> {
        let rec = self.state.read_container(id)?;
        let srec =
            self.state.read_sandbox(&rec.sandbox_id)?.ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        if !self.vms.alive(&srec) {
            return Err(RuntimeError::WrongState(format!("container {id}: container not running")));
        }
        self.vms.connect(&srec, crate::vm::Calls::Bounded).await
    }

    pub async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        let (_lock, _rec, a, _) = self.locked_live(id, "pause", &[Status::Running]).await?;
        Ok(a.pause_container(id).await?)
    }

    pub async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        let (_lock, _rec, a, _) = self.locked_live(id, "resume", &[Status::Paused]).await?;
        Ok(a.resume_container(id).await?)
    }

    /// Applies `linux.resources` JSON (already checked by the caller's parser).
    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<(), RuntimeError> {
        let res: oci_spec::runtime::LinuxResources = serde_json::from_slice(&resources_json)
            .map_err(|e| RuntimeError::InvalidArgument(format!("update {id}: resources: {e}")))?;
        let (_lock, rec, a, _) = self.locked_live(id, "update", &LIVE).await?;
        if let Some(vm) = self.state.read_sandbox(&rec.sandbox_id)? {
            super::shape::check_fits(id, Some(&res), &vm)?;
        }
        Ok(a.update_container(id, resources_json).await?)
    }

    pub async fn processes(&self, id: &str) -> Result<Vec<pb::ProcessInfo>, RuntimeError> {
        let (_lock, _rec, a, _) = self.locked_live(id, "list processes of", &LIVE).await?;
        Ok(a.list_processes(id).await?)
    }

    pub async fn stats(&self, id: &str) -> Result<pb::ContainerStatsResponse, RuntimeError> {
        let (_lock, _rec, a, _) = self.locked_live(id, "get stats of", &LIVE).await?;
        Ok(a.container_stats(id).await?)
    }

    /// The agent's event stream of the container's sandbox, on a connection without call
    /// timeouts.
    pub async fn events(&self, id: &str) -> Result<crate::agent::Events, RuntimeError> {
        let rec = self.state.read_container(id)?;
        let srec =
            self.state.read_sandbox(&rec.sandbox_id)?.ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        let agent = self.vms.connect(&srec, crate::vm::Calls::Long).await?;
        Ok(agent.subscribe().await?)
    }
}
