//! `delete`: the container leaves its VM and the host, then its poststop hooks run; the VM goes
//! with its last container, and after it the sandbox's CNI network (DEL, then its namespace)
//! and its files.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::{Runtime, OCI_VERSION};
use crate::agent::{Agent, Status};
use crate::error::RuntimeError;
use crate::hooks::{self, HookState};
use crate::vm::{PowerOff, VmProcess, Vms};
use crate::{mounts, procinfo, share};

/// How long a delete waits for a container's relay to notice the process is gone.
const RELAY_EXIT_WAIT: Duration = Duration::from_secs(5);
/// How long a killed VMM that was never recorded gets to be gone.
const UNRECORDED_VMM_WAIT: Duration = Duration::from_secs(10);
/// The VM description husk-vmm is started with (`--config <sandbox dir>/vm.json`, see
/// `vm::husk_vmm`), by which a VMM that was never recorded is recognised.
const VM_CONFIG_FILE: &str = "vm.json";

impl<V: Vms> Runtime<V> {
    /// A stopped container (VM gone included) needs no `force`; `vm` is the VMM this process
    /// started for it, if any, reaped when the VM goes.
    pub async fn delete(&self, id: &str, force: bool, vm: VmProcess) -> Result<(), RuntimeError> {
        self.delete_known(id, force, vm, None).await
    }

    /// Deletes `id` for a caller that saw its init exit (a foreground run, after its wait): a
    /// stopped container, whose state is not asked of the guest again.
    pub async fn delete_exited(&self, id: &str, vm: VmProcess) -> Result<(), RuntimeError> {
        self.delete_known(id, true, vm, Some(Status::Stopped)).await
    }

    async fn delete_known(
        &self,
        id: &str,
        force: bool,
        vm: VmProcess,
        known: Option<Status>,
    ) -> Result<(), RuntimeError> {
        let (lock, rec) = match self.state.lock_container_async(id).await {
            // As runc: forcing the delete of a container that is gone succeeds, so a caller
            // retrying a delete (containerd does) is done. What a create killed before it
            // recorded the container left goes too: its reservation, and a sandbox of that name
            // that no container holds.
            Err(RuntimeError::NotFound(_)) if force => {
                self.state.remove_unrecorded_container_async(id).await?;
                return self.remove_orphan_sandbox(id).await;
            }
            r => r?,
        };
        crate::timeline::mark("delete: lock taken");
        let (status, agent) = match known {
            Some(s) => (s, self.vm_agent(&rec).await),
            None => self.status(&rec).await?,
        };
        crate::timeline::mark("delete: status read");
        if matches!(status, Status::Running | Status::Paused) && !force {
            return Err(RuntimeError::WrongState(format!(
                "cannot delete container {id} that is not stopped: {}",
                status.as_str()
            )));
        }
        // A VM's last container that no longer runs (exited, or never started) goes with the
        // VM (the agent kills what is left when the sandbox is destroyed): taking it apart in
        // the guest first would be wasted work. A running one is stopped in the guest first, so
        // a delete killed before the VM is off leaves it stopped.
        let vm_goes = agent.is_some()
            && !matches!(status, Status::Running | Status::Paused)
            && self.is_last_container(&rec.sandbox_id, id)?;
        if let (Some(a), false) = (&agent, vm_goes) {
            remove_in_guest(a, id).await?;
        }
        crate::fault::point("delete-after-agent");
        if !vm_goes {
            self.wait_for_relay(&rec).await;
        }
        mounts::unmount_all(&rec.host_mounts);
        let mine = share::shared_dir(&self.state, &rec.sandbox_id).join(id);
        mounts::unmount_under(&mine)?;
        let _ = std::fs::remove_dir_all(&mine);
        let unremoved = if vm_goes { agent.as_ref() } else { None };
        // Nothing of a last container whose init has exited (or never ran its program) runs on
        // in its own PID namespace, so the guest has nothing left to do before the VM stops.
        let how = if vm_goes && rec.own_pid_namespace && matches!(status, Status::Stopped | Status::Created) {
            PowerOff::Discard
        } else {
            PowerOff::Destroy
        };
        self.leave_sandbox(&rec.sandbox_id, id, vm, unremoved, how).await?;
        crate::timeline::mark("delete: sandbox left");
        if vm_goes {
            // Its streams ended with the VM.
            self.wait_for_relay(&rec).await;
        }
        crate::fault::point("delete-sandbox-left");
        self.state.remove_container(id)?;
        drop(lock);
        let state = HookState {
            oci_version: OCI_VERSION,
            id,
            status: "stopped",
            pid: 0,
            bundle: &rec.bundle,
            annotations: &rec.annotations,
        };
        hooks::run_logged("poststop", &rec.poststop, &state).await;
        Ok(())
    }

    /// Deletes `id` after the process that served it (a shim) died. Nothing controls its VM any
    /// more and the VM's other containers are lost with it, so the VM is killed first, without
    /// a word to the guest; what is left is a force delete of a stopped container, bounded by
    /// local work (containerd allows a dead shim's cleanup a few seconds).
    pub async fn delete_abandoned(&self, id: &str) -> Result<(), RuntimeError> {
        if let Ok(rec) = self.state.read_container(id) {
            if let Ok(Some(vm)) = self.state.read_sandbox(&rec.sandbox_id) {
                self.vms.kill(&vm).await;
            }
        }
        self.delete(id, true, VmProcess::default()).await
    }

    /// Whether `cid` is the only container its sandbox's record holds.
    fn is_last_container(&self, sid: &str, cid: &str) -> Result<bool, RuntimeError> {
        Ok(match self.state.read_sandbox(sid)? {
            Some(s) => s.containers.iter().all(|c| c == cid),
            None => false,
        })
    }

    /// The relay ends once its process is gone; one whose VM vanished may need a push.
    async fn wait_for_relay(&self, rec: &crate::state::ContainerRecord) {
        let me = std::process::id() as i32;
        let deadline = Instant::now() + RELAY_EXIT_WAIT;
        while rec.relay_pid != me
            && procinfo::alive(rec.relay_pid, rec.relay_start)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if rec.relay_pid != me {
            procinfo::signal(rec.relay_pid, rec.relay_start, Signal::SIGKILL);
        }
    }

    /// Takes `cid` out of its sandbox's record; the last one out powers the VM off, `how` says
    /// how (for `cid` being the last).
    /// `unremoved`: the agent that still holds `cid`, left there because its VM was to go with
    /// it; if another container joined the sandbox meanwhile, the VM stays and `cid` is
    /// removed from it here.
    pub(super) async fn leave_sandbox(
        &self,
        sid: &str,
        cid: &str,
        vm: VmProcess,
        unremoved: Option<&V::Agent>,
        how: PowerOff,
    ) -> Result<(), RuntimeError> {
        let (_slock, srec) = self.state.lock_sandbox_async(sid).await?;
        let Some(mut srec) = srec else {
            return self.release_sandbox(sid).await;
        };
        srec.containers.retain(|c| c != cid);
        if let (Some(a), false) = (unremoved, srec.containers.is_empty()) {
            remove_in_guest(a, cid).await?;
        }
        if srec.containers.is_empty() {
            mounts::unmount_under(&share::shared_dir(&self.state, sid))?;
            self.vms.power_off(&srec, vm, how).await;
            crate::fault::point("delete-vm-off");
            self.release_sandbox(sid).await
        } else {
            self.state.write_sandbox(&srec)
        }
    }

    /// What is left of a sandbox whose VM is off (its taps unwired with it): its CNI network
    /// (DEL, then the namespace), then its files. The caller holds the sandbox's lock. When DEL
    /// fails the files stay, CNI record included, for a later delete to try again.
    pub(super) async fn release_sandbox(&self, sid: &str) -> Result<(), RuntimeError> {
        crate::cni::detach(&self.state, sid).await?;
        // A `husk run` killed before its own cleanup leaves its files (an unpacked image too).
        let run = self.state.run_dir(sid);
        if run.exists() {
            std::fs::remove_dir_all(&run).map_err(RuntimeError::io(format!("removing {}", run.display())))?;
        }
        share::remove_files(&self.state, sid)
    }

    /// Removes sandbox `sid` if no container holds it: a leftover of a create whose caller was
    /// killed (`husk run` after CNI ADD or the VM's boot, before the container was recorded).
    /// Its VM, if one runs, is powered off; then its network and files go. A sandbox that holds
    /// containers, or does not exist, is left alone.
    pub async fn remove_orphan_sandbox(&self, sid: &str) -> Result<(), RuntimeError> {
        crate::state::check_id(sid)?;
        if !self.state.sandbox_dir(sid).is_dir() {
            return Ok(());
        }
        let (_slock, srec) = self.state.lock_sandbox_async(sid).await?;
        match srec {
            Some(r) if !r.containers.is_empty() => return Ok(()),
            Some(r) => {
                tracing::info!("sandbox {sid}: removing it (no container holds it)");
                mounts::unmount_under(&share::shared_dir(&self.state, sid))?;
                self.vms.power_off(&r, VmProcess::default(), PowerOff::Destroy).await;
            }
            // Killed while its VM booted, before the VM was recorded: the VMM may still run.
            None => self.kill_unrecorded_vmm(sid).await,
        }
        self.release_sandbox(sid).await
    }

    /// Kills the VMM of sandbox `sid` that runs without a record (its create was killed between
    /// starting it and writing `sandbox.json`), and removes its cgroup. The caller holds the
    /// sandbox's lock, so no create of `sid` is under way. Found by its config file argument,
    /// which names this state root's sandbox directory (the cgroup is per sandbox id only, and
    /// another state root may use the same id).
    async fn kill_unrecorded_vmm(&self, sid: &str) {
        let config = self.state.sandbox_dir(sid).join(VM_CONFIG_FILE);
        let vmms = procinfo::with_arg(config.as_os_str());
        for &(pid, start) in &vmms {
            tracing::info!("sandbox {sid}: killing husk-vmm {pid}, which runs without a record");
            procinfo::signal(pid, start, Signal::SIGKILL);
        }
        let deadline = Instant::now() + UNRECORDED_VMM_WAIT;
        while vmms.iter().any(|&(pid, start)| procinfo::alive(pid, start)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sid = sid.to_string();
        let _ = tokio::task::spawn_blocking(move || crate::vm::cgroup::remove(&sid)).await;
    }
}

/// Removes container `id` in its VM; one the agent no longer knows is removed already.
async fn remove_in_guest<A: Agent>(agent: &A, id: &str) -> Result<(), RuntimeError> {
    match agent.remove_container(id, true).await {
        Err(e) if e.code() != Some(tonic::Code::NotFound) => Err(e.into()),
        _ => Ok(()),
    }
}
