//! Reaps every child (the agent is PID 1 in the guest, a child subreaper in host mode) and
//! hands each exit status to whoever watches that PID.
//!
//! A container's processes become the agent's children when the short-lived helper that created
//! them exits, and may end before anyone asked about them, so exits of PIDs nobody watches yet
//! are kept (bounded) until a watcher arrives.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: i32,
    pub signal: i32,
    pub core_dumped: bool,
}

impl ExitStatus {
    fn from_wait(status: WaitStatus) -> Option<(i32, Self)> {
        match status {
            WaitStatus::Exited(pid, code) => {
                Some((pid.as_raw(), Self { code, signal: 0, core_dumped: false }))
            }
            WaitStatus::Signaled(pid, sig, core) => {
                Some((pid.as_raw(), Self { code: 0, signal: sig as i32, core_dumped: core }))
            }
            _ => None,
        }
    }

    /// The shell convention: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        if self.signal != 0 {
            128 + self.signal
        } else {
            self.code
        }
    }
}

impl From<ExitStatus> for husk_proto::ExitStatus {
    fn from(s: ExitStatus) -> Self {
        Self { exit_code: s.code, signal: s.signal, core_dumped: s.core_dumped }
    }
}

pub type ExitWatch = watch::Receiver<Option<ExitStatus>>;

/// Exits of unwatched PIDs kept at most (orphans from inside containers pile up here too).
const MAX_UNCLAIMED: usize = 4096;

#[derive(Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    watched: HashMap<i32, watch::Sender<Option<ExitStatus>>>,
    unclaimed: HashMap<i32, ExitStatus>,
    unclaimed_order: VecDeque<i32>,
}

impl Reaper {
    /// Watches `pid`, which must be a child (or future orphan) of the agent. Call it right after
    /// learning the PID; an exit reaped before is delivered at once.
    pub fn watch(&self, pid: i32) -> ExitWatch {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = inner.watched.get(&pid) {
            return tx.subscribe();
        }
        let status = inner.unclaimed.remove(&pid);
        let (tx, rx) = watch::channel(status);
        if status.is_none() {
            inner.watched.insert(pid, tx);
        }
        rx
    }

    /// Reaps every child that has exited and delivers their statuses.
    pub fn reap(&self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let Some((pid, exit)) = ExitStatus::from_wait(status) else { continue };
            tracing::debug!("reaped {pid}: {exit:?}");
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(tx) = inner.watched.remove(&pid) {
                let _ = tx.send(Some(exit));
            } else {
                if inner.unclaimed_order.len() >= MAX_UNCLAIMED {
                    if let Some(old) = inner.unclaimed_order.pop_front() {
                        inner.unclaimed.remove(&old);
                    }
                }
                inner.unclaimed.insert(pid, exit);
                inner.unclaimed_order.push_back(pid);
            }
        }
    }

    /// Reaps on every SIGCHLD, for ever.
    pub async fn run(&self) -> std::io::Result<()> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        loop {
            self.reap();
            sigchld.recv().await;
        }
    }
}

/// Waits for the exit a watch reports.
pub async fn wait(mut rx: ExitWatch) -> Option<ExitStatus> {
    rx.wait_for(Option::is_some).await.ok().and_then(|s| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_code() {
        assert_eq!(ExitStatus { code: 3, signal: 0, core_dumped: false }.shell_code(), 3);
        assert_eq!(ExitStatus { code: 0, signal: 9, core_dumped: false }.shell_code(), 137);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn exit_before_watch_is_kept() {
        let r = Reaper::default();
        // Reaped by the Reaper under test, not by Child::wait.
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("/bin/sh").args(["-c", "exit 7"]).spawn().expect("spawn sh");
        let pid = child.id() as i32;
        // Reap until the child shows up, then watch it late.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !r.inner.lock().expect("lock").unclaimed.contains_key(&pid)
            && std::time::Instant::now() < deadline
        {
            r.reap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let status = wait(r.watch(pid)).await.expect("status");
        assert_eq!(status, ExitStatus { code: 7, signal: 0, core_dumped: false });
    }
}
