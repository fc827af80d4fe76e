//! Sandbox VMs behind a trait: the lifecycle boots, reaches and destroys them through [`Vms`],
//! which is husk-vmm processes ([`husk_vmm::HuskVmm`]) in use and a fake in unit tests.

pub mod cgroup;
pub mod husk_vmm;
pub mod release;
pub mod snapshot;
pub mod spawn;

use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use crate::agent::Agent;
use crate::error::RuntimeError;
use crate::state::{SandboxRecord, StateDir};

/// An extra virtio-fs share, fixed when the VM boots.
#[derive(Debug, Clone)]
pub struct ExtraShare {
    pub tag: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// What a new VM looks like.
#[derive(Debug, Clone)]
pub struct VmShape {
    pub memory_mib: u32,
    pub vcpus: u32,
    pub hostname: String,
    pub extra_shares: Vec<ExtraShare>,
    /// The pod's network namespace, wired to taps the VMM opens there.
    pub network: Option<crate::network::Wired>,
}

/// The VMM process this process started (a child, by pid), while it lives, so a long-lived
/// caller such as `husk run` reaps it. Reaping happens off the async runtime threads.
#[derive(Debug, Default)]
pub struct VmProcess {
    pid: Option<i32>,
    /// The wait status, once reaped.
    status: Option<i32>,
    /// Our end of the socket the VMM sends a duplicate of its KVM VM descriptor over
    /// (`husk_vmm::handover`), so that the VM's slow kernel teardown is not part of its exit.
    handover: Option<OwnedFd>,
}

/// How a VMM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    Code(i32),
    Signal(i32),
}

impl VmExit {
    fn from_status(status: i32) -> Self {
        if libc::WIFSIGNALED(status) {
            Self::Signal(libc::WTERMSIG(status))
        } else {
            Self::Code(libc::WEXITSTATUS(status))
        }
    }
}

impl VmProcess {
    pub fn new(pid: i32) -> Self {
        Self { pid: Some(pid), status: None, handover: None }
    }

    /// With our end of the VMM's handover socket.
    pub fn with_handover(mut self, socket: OwnedFd) -> Self {
        self.handover = Some(socket);
        self
    }

    /// Once the VMM is gone: takes the VM descriptor it handed over, if any, and closes it in
    /// a detached process ([`release::close_detached`]), where the kernel's teardown of the VM
    /// waits without holding anyone up; that process then removes `cgroup`, which KVM's
    /// threads for the VM leave only then. Returns whether it took the cgroup over.
    pub fn release_vm(&mut self, cgroup: Option<&std::path::Path>) -> bool {
        let Some(socket) = self.handover.take() else { return false };
        let stream = std::os::unix::net::UnixStream::from(socket);
        let mut buf = [0u8; 1];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = nix::sys::socket::recvmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let Ok(msg) = msg else { return false };
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(list) = c {
                    fds.extend(list);
                }
            }
        }
        // SAFETY: SCM_RIGHTS gave this process new descriptors that nothing else owns.
        let mut fds: Vec<OwnedFd> = fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
        let (Some(fd), true) = (fds.pop(), fds.is_empty()) else { return false };
        // What a (possibly compromised) VMM sent is only worth a process if it is a VM.
        let target = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)));
        if !target.is_ok_and(|t| t.as_os_str() == "anon_inode:kvm-vm") {
            return false;
        }
        release::close_detached(fd, cgroup)
    }

    /// How it ended, if it has (and is our child).
    pub fn try_wait(&mut self) -> Option<VmExit> {
        if let Some(s) = self.status {
            return Some(VmExit::from_status(s));
        }
        let pid = self.pid?;
        let mut status = 0;
        // SAFETY: waitpid on our own child; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        (r == pid).then(|| {
            self.status = Some(status);
            VmExit::from_status(status)
        })
    }

    /// How it ended, once a process seen gone can be reaped: the leader of a dying thread group
    /// shows as a zombie before its last thread has exited, and only then can it be reaped.
    /// None if it is not (or no longer) our child to reap, or not reapable within `limit`.
    pub async fn wait_gone(&mut self, limit: std::time::Duration) -> Option<VmExit> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(s) = self.status {
                return Some(VmExit::from_status(s));
            }
            let pid = self.pid?;
            let mut status = 0;
            // SAFETY: waitpid on our own child; WNOHANG never blocks. ECHILD means another
            // reaper (a shim's) took it, and then there is nothing to wait for.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                self.status = Some(status);
                continue;
            }
            if r < 0 || std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Whether it has exited (false when there is no child to ask).
    pub fn exited(&mut self) -> bool {
        self.try_wait().is_some()
    }

    pub fn kill(&mut self) {
        if let (Some(pid), None) = (self.pid, self.status) {
            // SAFETY: the child is not reaped, so `pid` is still ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Waits for the child to exit, on a blocking thread; how it ended, if it was ours.
    pub async fn reap(mut self) -> Option<VmExit> {
        if let Some(e) = self.try_wait() {
            return Some(e);
        }
        let pid = self.pid?;
        tokio::task::spawn_blocking(move || {
            let mut status = 0;
            loop {
                // SAFETY: a blocking waitpid on our own child.
                let r = unsafe { libc::waitpid(pid, &mut status, 0) };
                if r == pid {
                    return Some(VmExit::from_status(status));
                }
                if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}

/// A VM that has booted and whose agent answered.
#[derive(Debug)]
pub struct Booted<A> {
    pub record: SandboxRecord,
    pub process: VmProcess,
    pub agent: A,
}

/// How long the calls on a connection may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calls {
    /// Every call is bounded: a stalled guest gives an error, never a hung command.
    Bounded,
    /// Calls that last as long as a process (waits, event streams).
    Long,
}

/// How a VM's end treats its guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOff {
    /// The agent kills what still runs in the guest and syncs the shares, then the VM stops.
    Destroy,
    /// Nothing runs in the guest that could still write to a share (its last container's
    /// init has exited, and with it the PID namespace it was PID 1 of, or never ran the
    /// container's program): the VM stops at once. What the container wrote is on the host
    /// already, since the guest's FUSE client writes a file's dirty pages back when the file is
    /// closed or unmapped, which a process's exit does.
    Discard,
}

/// Booting, reaching and destroying sandbox VMs.
pub trait Vms: Send + Sync + 'static {
    type Agent: Agent;

    /// Boots a VM for sandbox `sid` (whose directory the caller holds locked), waits for its
    /// agent and prepares the guest. On error nothing is left running.
    fn boot(
        &self,
        state: &StateDir,
        sid: &str,
        shape: &VmShape,
    ) -> impl Future<Output = Result<Booted<Self::Agent>, RuntimeError>> + Send;

    /// Whether the sandbox's VM still runs.
    fn alive(&self, rec: &SandboxRecord) -> bool;

    /// Connects to a running sandbox's agent.
    fn connect(
        &self,
        rec: &SandboxRecord,
        calls: Calls,
    ) -> impl Future<Output = Result<Self::Agent, RuntimeError>> + Send;

    /// Powers the VM off (or kills it) and waits for it to go. The caller holds the sandbox
    /// lock; the sandbox's files are the caller's to remove.
    fn power_off(
        &self,
        rec: &SandboxRecord,
        process: VmProcess,
        how: PowerOff,
    ) -> impl Future<Output = ()> + Send;

    /// Called once the sandbox's first container is created, before its process has run:
    /// where the VM was asked to, it records its snapshot's working set now.
    fn first_container_created(&self, _rec: &SandboxRecord) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Kills the VM at once, without a word to the guest, and waits (briefly) for it to go:
    /// for a VM whose controlling process died, where nothing in it is worth waiting for.
    fn kill(&self, rec: &SandboxRecord) -> impl Future<Output = ()> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_gone_child_is_waited_for_and_a_stranger_is_not() {
        // Reaped below through waitpid, as husk reaps its VMMs, not through `Child::wait`.
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("/bin/sh").args(["-c", "exit 3"]).spawn().expect("spawn");
        let mut p = VmProcess::new(child.id() as i32);
        assert_eq!(p.wait_gone(Duration::from_secs(10)).await, Some(VmExit::Code(3)));
        assert_eq!(p.try_wait(), Some(VmExit::Code(3)), "the status is kept");
        // Not our child (PID 1): nothing to wait for, at once.
        let start = std::time::Instant::now();
        assert_eq!(VmProcess::new(1).wait_gone(Duration::from_secs(10)).await, None);
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
