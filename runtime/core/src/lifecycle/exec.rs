//! `exec`: another process in a running container.

use husk_proto as pb;

use super::{Held, Runtime};
use crate::agent::{Agent, Status};
use crate::error::RuntimeError;
use crate::relay::Target;
use crate::stdio::{self, StdioStrategy};
use crate::vm::{VmProcess, Vms};

/// An exec's process and how its stdio is wired.
#[derive(Debug, Clone)]
pub struct ExecOpts {
    /// The OCI process object, JSON.
    pub process_json: Vec<u8>,
    pub terminal: bool,
    pub stdio: StdioStrategy,
    /// Exec into a paused container too (the process starts frozen with it).
    pub ignore_paused: bool,
    /// The exec's id in the guest (a caller that names its processes); a fresh one if none.
    pub exec_id: Option<String>,
}

impl<V: Vms> Runtime<V> {
    pub async fn exec(&self, id: &str, opts: ExecOpts) -> Result<Option<Held>, RuntimeError> {
        opts.stdio.check(opts.terminal)?;
        let (lock, rec) = self.state.lock_container_async(id).await?;
        let (status, agent) = self.status(&rec).await?;
        let agent = match (status, agent) {
            (Status::Running, Some(a)) => a,
            (Status::Paused, Some(a)) if opts.ignore_paused => a,
            (s, _) => {
                return Err(RuntimeError::WrongState(format!("cannot exec in a {} container", s.as_str())))
            }
        };
        let srec =
            self.state.read_sandbox(&rec.sandbox_id)?.ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        let exec_id = match opts.exec_id {
            Some(e) => {
                crate::state::check_id(&e)?;
                e
            }
            None => new_exec_id(),
        };
        let target = Target { vsock: srec.vsock.clone(), container_id: id.into(), exec_id: exec_id.clone() };
        let (pstdio, relay, streams) = stdio::wire(&agent, &target, opts.terminal, true, &opts.stdio).await?;
        let req = pb::ExecProcessRequest {
            container_id: id.into(),
            exec_id,
            oci_process_json: opts.process_json,
            stdio: Some(pstdio),
        };
        crate::fault::point("exec-before-agent");
        let guest_pid = agent.exec_process(req).await?;
        crate::fault::point("exec-after-agent");
        let pid = relay.as_ref().map(|r| r.pid).unwrap_or(std::process::id() as i32);
        if let StdioStrategy::Relay { pid_file: Some(p), .. } = &opts.stdio {
            crate::state::write_atomic(p, &pid.to_string())?;
        }
        if let Some(r) = relay {
            r.go()?;
        }
        drop(lock);
        Ok(streams.map(|guest| Held { target, guest_pid, guest, vm: VmProcess::default(), started: true }))
    }
}

/// A fresh exec id (agent rules: 1-64 of [A-Za-z0-9_.-]).
pub(super) fn new_exec_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("exec-{}-{hex}", std::process::id())
}
