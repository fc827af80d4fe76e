//! A fake agent and VM backend for unit tests of the lifecycle: containers are entries in a
//! shared map, VMs are names in a set, and any step can be made to fail.

use std::collections::{HashMap, HashSet};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

use husk_proto as pb;

use super::{Agent, AgentError, AgentResult, Events, Status};
use crate::error::RuntimeError;
use crate::state::{SandboxRecord, StateDir};
use crate::vm::{Booted, Calls, PowerOff, VmProcess, VmShape, Vms};

/// A step the fake can be told to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Boot,
    OpenStdio,
    CreateContainer,
    StartContainer,
    RemoveContainer,
}

#[derive(Debug, Default)]
pub struct World {
    pub containers: HashMap<String, Status>,
    pub running_vms: HashSet<String>,
    pub fail: HashSet<Step>,
    pub boots: usize,
    pub power_offs: usize,
    /// Power-offs that stopped the VM without asking the guest to clean up.
    pub discards: usize,
    /// VMs killed without a word to the guest.
    pub kills: usize,
    /// Containers removed through the agent, in order.
    pub removed: Vec<String>,
    pub execs: Vec<String>,
    /// How processes ended, by `container` or `container/exec`; a wait returns once its
    /// process is here (a SIGKILL puts it here, a test may too).
    pub exits: HashMap<String, pb::ExitStatus>,
    /// Signals delivered, as (process key, signal).
    pub signals: Vec<(String, i32)>,
    /// Container states asked for.
    pub status_reads: usize,
    /// StartContainer requests.
    pub starts: usize,
    /// Creates act as an agent that predates `CreateContainerRequest.start`: never started.
    pub create_never_starts: bool,
    /// Stdio streams opened, by name.
    pub streams: Vec<String>,
    /// `first_container_created` calls: the sandbox, and the guest's containers then.
    pub first_created: Vec<(String, Vec<String>)>,
}

/// The key of a process in [`World::exits`].
pub fn process_key(container_id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        container_id.to_string()
    } else {
        format!("{container_id}/{exec_id}")
    }
}

#[derive(Debug, Clone, Default)]
pub struct Fake(pub Arc<Mutex<World>>);

impl Fake {
    pub fn world(&self) -> MutexGuard<'_, World> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn step(&self, s: Step) -> AgentResult<()> {
        if self.world().fail.contains(&s) {
            Err(AgentError::Rpc { call: "fake", status: tonic::Status::internal(format!("{s:?} fails")) })
        } else {
            Ok(())
        }
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut Status) -> AgentResult<T>) -> AgentResult<T> {
        match self.world().containers.get_mut(id) {
            Some(s) => f(s),
            None => Err(AgentError::Rpc { call: "fake", status: tonic::Status::not_found(id.to_string()) }),
        }
    }
}

fn precondition(what: &str) -> AgentError {
    AgentError::Rpc { call: "fake", status: tonic::Status::failed_precondition(what.to_string()) }
}

impl Agent for Fake {
    async fn create_sandbox(&self, _req: pb::CreateSandboxRequest) -> AgentResult<()> {
        Ok(())
    }

    async fn destroy_sandbox(&self) -> AgentResult<()> {
        Ok(())
    }

    async fn create_container(
        &self,
        req: pb::CreateContainerRequest,
    ) -> AgentResult<pb::CreateContainerResponse> {
        self.step(Step::CreateContainer)?;
        let mut w = self.world();
        if w.containers.contains_key(&req.container_id) {
            return Err(AgentError::Rpc { call: "fake", status: tonic::Status::already_exists("exists") });
        }
        let started = req.start && !w.create_never_starts;
        w.containers.insert(req.container_id, if started { Status::Running } else { Status::Created });
        Ok(pb::CreateContainerResponse { pid: 100 + w.containers.len() as u32, started })
    }

    async fn start_container(&self, id: &str) -> AgentResult<()> {
        self.step(Step::StartContainer)?;
        self.world().starts += 1;
        self.with(id, |s| match s {
            Status::Created => {
                *s = Status::Running;
                Ok(())
            }
            _ => Err(precondition("not created")),
        })
    }

    async fn container_status(&self, id: &str) -> AgentResult<Option<Status>> {
        let mut w = self.world();
        w.status_reads += 1;
        Ok(w.containers.get(id).copied())
    }

    async fn remove_container(&self, id: &str, _force: bool) -> AgentResult<()> {
        self.step(Step::RemoveContainer)?;
        let mut w = self.world();
        match w.containers.remove(id) {
            Some(_) => {
                w.removed.push(id.to_string());
                Ok(())
            }
            None => Err(AgentError::Rpc { call: "fake", status: tonic::Status::not_found(id.to_string()) }),
        }
    }

    async fn pause_container(&self, id: &str) -> AgentResult<()> {
        self.with(id, |s| {
            *s = Status::Paused;
            Ok(())
        })
    }

    async fn resume_container(&self, id: &str) -> AgentResult<()> {
        self.with(id, |s| {
            *s = Status::Running;
            Ok(())
        })
    }

    async fn update_container(&self, id: &str, _resources_json: Vec<u8>) -> AgentResult<()> {
        self.with(id, |_| Ok(()))
    }

    async fn list_processes(&self, id: &str) -> AgentResult<Vec<pb::ProcessInfo>> {
        self.with(id, |_| Ok(Vec::new()))
    }

    async fn container_stats(&self, id: &str) -> AgentResult<pb::ContainerStatsResponse> {
        self.with(id, |_| Ok(pb::ContainerStatsResponse::default()))
    }

    async fn exec_process(&self, req: pb::ExecProcessRequest) -> AgentResult<u32> {
        self.with(&req.container_id, |s| match s {
            Status::Running | Status::Paused => Ok(()),
            _ => Err(precondition("not running")),
        })?;
        let mut w = self.world();
        w.execs.push(req.exec_id);
        Ok(1000 + w.execs.len() as u32)
    }

    async fn signal_process(&self, req: pb::SignalProcessRequest) -> AgentResult<()> {
        let key = process_key(&req.container_id, &req.exec_id);
        self.with(&req.container_id, |s| match s {
            Status::Stopped => Err(precondition("not running")),
            _ => {
                if req.signal == libc::SIGKILL && req.exec_id.is_empty() {
                    *s = Status::Stopped;
                }
                Ok(())
            }
        })?;
        let mut w = self.world();
        w.signals.push((key.clone(), req.signal));
        if req.signal == libc::SIGKILL {
            w.exits.insert(key, pb::ExitStatus { exit_code: 0, signal: libc::SIGKILL, core_dumped: false });
        }
        Ok(())
    }

    async fn wait_process(&self, p: pb::ProcessRef) -> AgentResult<pb::ExitStatus> {
        let key = process_key(&p.container_id, &p.exec_id);
        loop {
            {
                let w = self.world();
                if let Some(s) = w.exits.get(&key) {
                    return Ok(*s);
                }
                // A container (and its execs) removed or its VM gone ends like a SIGKILL.
                if !w.containers.contains_key(&p.container_id) {
                    return Ok(pb::ExitStatus { exit_code: 0, signal: libc::SIGKILL, core_dumped: false });
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    async fn resize_tty(&self, _req: pb::ResizeTtyRequest) -> AgentResult<()> {
        Ok(())
    }

    async fn close_stdin(&self, _p: pb::ProcessRef) -> AgentResult<()> {
        Ok(())
    }

    async fn subscribe(&self) -> AgentResult<Events> {
        Ok(tokio::sync::mpsc::channel(1).1)
    }

    async fn open_stdio(&self, name: &str) -> AgentResult<UnixStream> {
        self.step(Step::OpenStdio).map_err(|_| AgentError::Stdio {
            name: name.into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        })?;
        let (a, _b) = UnixStream::pair().map_err(|source| AgentError::Stdio { name: name.into(), source })?;
        self.world().streams.push(name.to_string());
        Ok(a)
    }
}

impl Vms for Fake {
    type Agent = Fake;

    async fn boot(&self, state: &StateDir, sid: &str, shape: &VmShape) -> Result<Booted<Fake>, RuntimeError> {
        self.step(Step::Boot)?;
        let dir = state.sandbox_dir(sid);
        std::fs::create_dir_all(dir.join("shared")).map_err(RuntimeError::io("fake boot"))?;
        let mut w = self.world();
        w.boots += 1;
        w.running_vms.insert(sid.to_string());
        let record = SandboxRecord {
            id: sid.into(),
            vmm_pid: 0,
            vmm_start: 0,
            vsock: dir.join("vsock.sock"),
            containers: Vec::new(),
            memory_mib: shape.memory_mib,
            vcpus: shape.vcpus,
            network: shape.network.clone(),
            working_set: None,
        };
        Ok(Booted { record, process: VmProcess::default(), agent: self.clone() })
    }

    fn alive(&self, rec: &SandboxRecord) -> bool {
        self.world().running_vms.contains(&rec.id)
    }

    async fn connect(&self, rec: &SandboxRecord, _calls: Calls) -> Result<Fake, RuntimeError> {
        if self.alive(rec) {
            Ok(self.clone())
        } else {
            Err(RuntimeError::Vm(format!("the VM of sandbox {} is not running", rec.id)))
        }
    }

    async fn first_container_created(&self, rec: &SandboxRecord) {
        let mut w = self.world();
        let mut in_guest: Vec<String> = w.containers.keys().cloned().collect();
        in_guest.sort();
        w.first_created.push((rec.id.clone(), in_guest));
    }

    async fn kill(&self, rec: &SandboxRecord) {
        let mut w = self.world();
        if w.running_vms.remove(&rec.id) {
            w.kills += 1;
            w.containers.clear();
        }
    }

    async fn power_off(&self, rec: &SandboxRecord, _process: VmProcess, how: PowerOff) {
        let mut w = self.world();
        if w.running_vms.remove(&rec.id) {
            w.power_offs += 1;
            if how == PowerOff::Discard {
                w.discards += 1;
            }
            // Every container of the VM goes with it (the fake has one VM per test).
            w.containers.clear();
        }
    }
}
