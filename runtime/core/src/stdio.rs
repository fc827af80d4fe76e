//! Wiring a new container process to the host, by the caller's stdio strategy: its guest stdio
//! streams, the pty handed over `--console-socket`, and the detached relay process that stands
//! for it on the host.

use std::fs::File;
use std::io::{IoSlice, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use husk_proto as pb;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use crate::agent::{stream_name, Agent};
use crate::error::RuntimeError;
use crate::procinfo;
use crate::relay::{ChildArgs, GuestStreams, Target};

/// How a new process's stdio reaches the host.
#[derive(Debug, Clone)]
pub enum StdioStrategy {
    /// runc's model: a detached relay process stands for the process, with the caller's fds
    /// 0-2 (or a pty sent over `console_socket` for a terminal); its PID goes to `pid_file`,
    /// and it exits as the process does.
    Relay { console_socket: Option<PathBuf>, pid_file: Option<PathBuf> },
    /// The caller holds the guest streams and relays them itself: a foreground CLI, or a
    /// long-lived server that copies them to FIFOs. `size` is the terminal's, if any.
    Held { size: Option<(u16, u16)> },
}

impl StdioStrategy {
    /// Checks the strategy against the process before anything is created.
    pub fn check(&self, terminal: bool) -> Result<(), RuntimeError> {
        match self {
            StdioStrategy::Relay { console_socket: Some(s), .. } => check_console_socket(s),
            StdioStrategy::Relay { console_socket: None, .. } if terminal => {
                Err(RuntimeError::InvalidArgument(
                    "cannot allocate tty if runc will detach without setting console socket".into(),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Opens a new process's guest streams (its input only with `stdin`) and connects them as
/// `strategy` says: to a detached relay (which waits for [`RelayChild::go`]), or back to the
/// caller.
pub async fn wire<A: Agent>(
    agent: &A,
    target: &Target,
    terminal: bool,
    stdin: bool,
    strategy: &StdioStrategy,
) -> Result<(pb::Stdio, Option<RelayChild>, Option<GuestStreams>), RuntimeError> {
    let size = match strategy {
        StdioStrategy::Held { size } => *size,
        StdioStrategy::Relay { .. } => None,
    };
    let (stdio, streams) = open_streams(agent, terminal, stdin, size).await?;
    match strategy {
        StdioStrategy::Relay { console_socket, .. } => {
            let pty = console_socket.as_deref().filter(|_| terminal).map(console_pty).transpose()?;
            Ok((stdio, Some(spawn_relay(target.clone(), streams, pty)?), None))
        }
        StdioStrategy::Held { .. } => Ok((stdio, None, Some(streams))),
    }
}

/// Opens the guest streams a process needs: stdout, stdin when it takes input, and stderr
/// without a terminal. A stream not opened is /dev/null to the process.
pub async fn open_streams<A: Agent>(
    agent: &A,
    terminal: bool,
    stdin: bool,
    size: Option<(u16, u16)>,
) -> Result<(pb::Stdio, GuestStreams), RuntimeError> {
    let open = |name: String| async move {
        let s = agent.open_stdio(&name).await?;
        Ok::<_, RuntimeError>((name, s))
    };
    let input = async {
        if stdin {
            let (n, s) = open(stream_name("in")).await?;
            Ok((n, Some(s)))
        } else {
            Ok((String::new(), None))
        }
    };
    let err = async {
        if terminal {
            Ok((String::new(), None))
        } else {
            let (n, s) = open(stream_name("err")).await?;
            Ok((n, Some(s)))
        }
    };
    // At once: each is a connection round trip through the VMM to the guest. The lifeline is
    // held by whatever stands for the process on the host: if it dies, the agent kills the
    // process.
    let ((in_name, stdin), (out_name, stdout), (err_name, stderr), (life_name, lifeline)) =
        tokio::try_join!(input, open(stream_name("out")), err, open(stream_name("life")))?;
    let (rows, cols) = size.unwrap_or((0, 0));
    let stdio = pb::Stdio {
        stdin: in_name,
        stdout: out_name,
        stderr: err_name,
        terminal,
        rows: rows.into(),
        cols: cols.into(),
        lifeline: life_name,
    };
    Ok((stdio, GuestStreams { stdin, stdout: Some(stdout), stderr, lifeline: Some(lifeline) }))
}

/// Checks a `--console-socket` argument before anything is created.
pub fn check_console_socket(path: &Path) -> Result<(), RuntimeError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| RuntimeError::InvalidArgument(format!("console socket {}: {e}", path.display())))?;
    if !meta.file_type().is_socket() {
        return Err(RuntimeError::InvalidArgument(format!(
            "console socket {} is not a socket",
            path.display()
        )));
    }
    Ok(())
}

/// Makes a host pty, sends its master over `console_socket` (SCM_RIGHTS, as runc does), and
/// returns the slave.
pub fn console_pty(console_socket: &Path) -> Result<OwnedFd, RuntimeError> {
    let pty = nix::pty::openpty(None, None).map_err(RuntimeError::errno("openpty"))?;
    let sock = crate::uds::connect_std(console_socket)
        .map_err(RuntimeError::io(format!("connecting to console socket {}", console_socket.display())))?;
    let fds = [pty.master.as_raw_fd()];
    let name = b"/dev/ptmx";
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(RuntimeError::errno("sending the pty master over the console socket"))?;
    Ok(pty.slave)
}

/// A detached relay waiting to hear whether its process was created.
#[derive(Debug)]
pub struct RelayChild {
    pub pid: i32,
    pub start: u64,
    control: File,
}

impl RelayChild {
    /// The process exists: the relay starts relaying and waiting.
    pub fn go(mut self) -> Result<(), RuntimeError> {
        self.control.write_all(b"G").map_err(RuntimeError::io("signalling the relay"))
    }
    // Dropped without `go`: the relay reads EOF and exits.
}

/// Starts `husk __relay` for `target`. Without a terminal it inherits this process's fds 0-2
/// (the container's stdio as the caller gave them); with one it gets /dev/null there, so it
/// never holds a caller's output pipe.
pub fn spawn_relay(
    target: Target,
    guest: GuestStreams,
    terminal: Option<OwnedFd>,
) -> Result<RelayChild, RuntimeError> {
    let (ctl_read, ctl_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(RuntimeError::errno("pipe"))?;
    let raw = |s: &Option<std::os::unix::net::UnixStream>| s.as_ref().map(|s| s.as_raw_fd());
    let args = ChildArgs {
        target,
        guest_stdin: raw(&guest.stdin),
        guest_stdout: raw(&guest.stdout),
        guest_stderr: raw(&guest.stderr),
        guest_lifeline: raw(&guest.lifeline),
        terminal_fd: terminal.as_ref().map(|t| t.as_raw_fd()),
        control_fd: ctl_read.as_raw_fd(),
    };
    let pass: Vec<RawFd> = [
        args.guest_stdin,
        args.guest_stdout,
        args.guest_stderr,
        args.guest_lifeline,
        args.terminal_fd,
        Some(args.control_fd),
    ]
    .into_iter()
    .flatten()
    .collect();
    let json = serde_json::to_string(&args).map_err(|e| RuntimeError::Internal(e.to_string()))?;
    let exe = std::env::current_exe().map_err(RuntimeError::io("locating the husk binary"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("__relay").arg(json);
    if terminal.is_some() {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    }
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe calls
    // (close_range, fcntl) on descriptor numbers copied in before the fork.
    unsafe {
        cmd.pre_exec(move || {
            procinfo::cloexec_from_3();
            for &fd in &pass {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(RuntimeError::io("starting the relay process"))?;
    drop(ctl_read);
    drop(guest);
    drop(terminal);
    let pid = child.id() as i32;
    // Not waited for: it outlives this process and is reaped by whoever inherits it.
    drop(child);
    Ok(RelayChild { pid, start: procinfo::start_time(pid).unwrap_or(0), control: File::from(ctl_write) })
}
