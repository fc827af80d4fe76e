//! A container helper started ahead of need ("spare"): exec'd and parked on a control socket
//! until an op comes, so a request pays for neither the agent's fork nor the helper's exec and
//! start (most of a create's fixed cost in a guest). The first spare starts with the agent, so
//! a VM snapshot holds it parked; each one used is replaced a little later by a new one
//! started at `SCHED_IDLE`, which takes only CPU time nothing else wants. Without a spare (in use, still
//! being replaced, or dead) a helper is started fresh, as before.
//!
//! A parked helper is a fresh single-threaded process like any helper (see [`crate::oci`]);
//! it has made no random values of its own before its op (a restored VM's siblings hold the
//! same parked image), and it gets the op and its three stdio fds in one message:
//! a little-endian u32 length with the fds as `SCM_RIGHTS`, then that many bytes of op JSON.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::error::AgentError;
use crate::oci::{self, Launched, Op, CONTROL_FD};
use crate::reaper::Reaper;

/// How long after a spare is taken its replacement starts: a sandbox that runs one short
/// container is often gone by then, and its VM never spends CPU time on a spare it would not
/// use; a pod's next container usually comes later than this.
const REPLACE_DELAY: std::time::Duration = std::time::Duration::from_millis(200);

/// Longest op a parked helper takes (a spec with a large seccomp profile is tens of KiB).
const MAX_OP: usize = 8 << 20;

/// Ops up to this size are handed over on the runtime's thread: with the header they fit an
/// AF_UNIX socket's send buffer (208 KiB by default) with room to spare. Larger ones go to a
/// blocking thread.
const INLINE_OP: usize = 64 << 10;

/// A parked helper: its launch and the agent's end of its control socket.
struct Spare {
    helper: Launched,
    control: UnixStream,
}

/// Starts helpers for the agent's container ops, keeping one spare.
pub struct Helpers {
    reaper: Arc<Reaper>,
    spare: Mutex<Option<Spare>>,
    /// A replacement spare is being started.
    starting: AtomicBool,
}

impl Helpers {
    /// Starts the first spare (at the agent's own priority: it should be parked before the
    /// agent serves, and so in a snapshot of the VM).
    pub fn new(reaper: Arc<Reaper>) -> Arc<Self> {
        let h = Arc::new(Self { reaper, spare: Mutex::new(None), starting: AtomicBool::new(false) });
        match start_spare(&h.reaper) {
            Ok(s) => *h.slot() = Some(s),
            Err(e) => tracing::warn!("no spare container helper: {e}"),
        }
        h
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Spare>> {
        self.spare.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `op` in a helper with `stdio` as its fds 0–2 (the spare if there is one); returns
    /// the PID it reports.
    pub async fn run(self: &Arc<Self>, op: Op, stdio: [OwnedFd; 3]) -> Result<Option<i32>, AgentError> {
        let json = op.encode()?;
        let result = self.run_json(json, stdio).await;
        // Replaced once the op is done: the thread that starts the next spare would otherwise
        // take CPU time from the helper at work (all of it, in a one-vCPU VM).
        self.replace();
        result
    }

    async fn run_json(&self, json: String, stdio: [OwnedFd; 3]) -> Result<Option<i32>, AgentError> {
        let Some(spare) = self.slot().take() else {
            return oci::run_fresh(&self.reaper, &json, stdio).await;
        };
        let pid = spare.helper.pid;
        let handed = if json.len() <= INLINE_OP {
            // Fits the fresh control socket's buffer, so the writes cannot block.
            let r = hand(&spare.control, pid, &json, &stdio);
            (r, spare, json, stdio)
        } else {
            // Larger than the socket buffer: blocking writes, off the runtime's thread.
            tokio::task::spawn_blocking(move || {
                let r = hand(&spare.control, pid, &json, &stdio);
                (r, spare, json, stdio)
            })
            .await
            .map_err(|e| AgentError::Internal(format!("helper hand-off task: {e}")))?
        };
        match handed {
            (Ok(()), spare, json, _stdio) => {
                tracing::debug!("spare helper {pid} runs {json}");
                // Our copies of the stdio fds close here; the helper holds its own.
                oci::finish(spare.helper).await
            }
            // Gone before it took the op (killed, or out of memory): a fresh one does it.
            (Err(e), _, json, stdio) => {
                tracing::warn!("spare helper {pid}: {e}; starting a fresh one");
                oci::run_fresh(&self.reaper, &json, stdio).await
            }
        }
    }

    /// Starts a new spare in the background, [`REPLACE_DELAY`] later and at `SCHED_IDLE`, unless
    /// one is there or coming.
    fn replace(self: &Arc<Self>) {
        if self.slot().is_some() || self.starting.swap(true, Ordering::SeqCst) {
            return;
        }
        let h = self.clone();
        let spawned = std::thread::Builder::new().name("spare-helper".into()).spawn(move || {
            // This thread only: the helper forked from it inherits the policy.
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: sched_setscheduler on the calling thread (0) with a valid param.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
                tracing::debug!("SCHED_IDLE: {}", std::io::Error::last_os_error());
            }
            std::thread::sleep(REPLACE_DELAY);
            match start_spare(&h.reaper) {
                Ok(s) => {
                    let mut slot = h.slot();
                    if slot.is_none() {
                        *slot = Some(s);
                    }
                }
                Err(e) => tracing::warn!("no spare container helper: {e}"),
            }
            h.starting.store(false, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            tracing::warn!("no spare container helper: {e}");
            self.starting.store(false, Ordering::SeqCst);
        }
    }
}

fn start_spare(reaper: &Reaper) -> Result<Spare, AgentError> {
    let (ours, theirs) = UnixStream::pair().map_err(AgentError::io("helper control socket"))?;
    let theirs = OwnedFd::from(theirs);
    let helper =
        oci::launch(reaper, &["__oci-spare"], [Stdio::null(), Stdio::null(), Stdio::null()], Some(&theirs))?;
    Ok(Spare { helper, control: ours })
}

/// Gives parked helper `pid` its op and stdio.
fn hand(control: &UnixStream, pid: i32, json: &str, stdio: &[OwnedFd; 3]) -> std::io::Result<()> {
    // Back to the agent's own policy before it works for a request (it was started idle).
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on our child's PID with a valid param.
    if unsafe { libc::sched_setscheduler(pid, libc::SCHED_OTHER, &param) } != 0 {
        tracing::debug!("helper {pid}: SCHED_OTHER: {}", std::io::Error::last_os_error());
    }
    let len = u32::try_from(json.len()).ok().filter(|&n| n as usize <= MAX_OP);
    let len = len.ok_or_else(|| std::io::Error::other(format!("op of {} bytes is too large", json.len())))?;
    let fds: [RawFd; 3] = [stdio[0].as_raw_fd(), stdio[1].as_raw_fd(), stdio[2].as_raw_fd()];
    let header = len.to_le_bytes();
    let sent = sendmsg::<()>(
        control.as_raw_fd(),
        &[IoSlice::new(&header)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if sent != header.len() {
        return Err(std::io::Error::other("short write of the op header"));
    }
    let mut c = control;
    c.write_all(json.as_bytes())
}

/// The parked helper (`husk-agent __oci-spare`): waits for its op, takes its stdio, and runs
/// the op as any helper does. Never returns.
pub fn park_main() -> ! {
    // SAFETY: the agent set fd CONTROL_FD up for this process alone.
    let control = UnixStream::from(unsafe { OwnedFd::from_raw_fd(CONTROL_FD) });
    match receive(&control) {
        Ok((json, stdio)) => {
            for (fd, target) in stdio.iter().zip(0..) {
                // SAFETY: dup2 onto the standard fds, which this process owns.
                if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
                    let e = std::io::Error::last_os_error();
                    oci::finish_helper(Err(format!("taking the container's stdio: {e}")));
                }
            }
            drop(stdio);
            drop(control);
            oci::helper_main(&json)
        }
        // The agent let go of it without an op (its control socket closed): nothing to do.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => std::process::exit(0),
        Err(e) => oci::finish_helper(Err(format!("receiving the op: {e}"))),
    }
}

/// The op and the three stdio fds, as [`hand`] sends them.
fn receive(control: &UnixStream) -> std::io::Result<(String, Vec<OwnedFd>)> {
    let mut header = [0u8; 4];
    let mut cmsg = nix::cmsg_space!([RawFd; 3]);
    let (got, fds) = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let msg = loop {
            match recvmsg::<()>(control.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r?,
            }
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(list) = c {
                // SAFETY: SCM_RIGHTS hands us fresh fds that nothing else owns.
                fds.extend(list.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    if got == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let mut c = control;
    c.read_exact(&mut header[got..])?;
    if fds.len() != 3 {
        return Err(std::io::Error::other(format!("the op came with {} fds, not 3", fds.len())));
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_OP {
        return Err(std::io::Error::other(format!("op of {len} bytes is too large")));
    }
    let mut json = vec![0u8; len];
    c.read_exact(&mut json)?;
    let json = String::from_utf8(json).map_err(|_| std::io::Error::other("the op is not UTF-8"))?;
    Ok((json, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stdio() -> [OwnedFd; 3] {
        let f = || OwnedFd::from(std::fs::File::open("/dev/null").expect("/dev/null"));
        [f(), f(), f()]
    }

    #[test]
    fn an_op_and_its_fds_arrive_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        // Larger than a socket buffer: the reader runs alongside.
        let json = format!("{{\"op\":\"delete\",\"pad\":\"{}\"}}", "x".repeat(1 << 20));
        let reader = std::thread::spawn(move || receive(&b));
        hand(&a, 0, &json, &stdio()).unwrap();
        let (got, fds) = reader.join().unwrap().unwrap();
        assert_eq!(got, json);
        assert_eq!(fds.len(), 3);
    }

    #[test]
    fn a_closed_control_socket_is_end_of_file() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert_eq!(receive(&b).unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn bad_ops_are_refused() {
        // Too long a length.
        let (a, b) = UnixStream::pair().unwrap();
        let fds = stdio();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let header = ((MAX_OP + 1) as u32).to_le_bytes();
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&header)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert!(receive(&b).unwrap_err().to_string().contains("too large"));
        // No fds.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&2u32.to_le_bytes()).unwrap();
        (&a).write_all(b"{}").unwrap();
        assert!(receive(&b).unwrap_err().to_string().contains("0 fds"));
        // Cut short.
        let (a, b) = UnixStream::pair().unwrap();
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&9u32.to_le_bytes())],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        (&a).write_all(b"{}").unwrap();
        drop(a);
        assert_eq!(receive(&b).unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
