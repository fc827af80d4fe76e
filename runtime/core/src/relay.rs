//! The host side of a container process: relays its stdio between host descriptors and the
//! guest's vsock streams, forwards the signals it receives, resizes the guest pty when its
//! host terminal is resized, and reports how the process ended.
//!
//! The same loop runs in two places: in a detached `husk __relay` process (the PID behind
//! `--pid-file`, which containerd's shim and conmon wait on and which mirrors the container's
//! exit status as its own), and inside a foreground `husk run`/`husk exec`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use husk_proto as pb;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};

use crate::agent::{Agent, GrpcAgent};
use crate::error::RuntimeError;

/// How long output may keep draining after the process has exited (a background child can
/// hold the streams open for ever).
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Signals a relay passes on to the container process.
const FORWARDED: [libc::c_int; 8] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGCONT,
];

/// Which process in which sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub vsock: PathBuf,
    pub container_id: String,
    pub exec_id: String,
}

/// The guest ends of the process's streams (absent: not connected).
#[derive(Debug)]
pub struct GuestStreams {
    pub stdin: Option<UnixStream>,
    pub stdout: Option<UnixStream>,
    pub stderr: Option<UnixStream>,
    /// Held for as long as the relay lives; its close tells the agent to kill the process.
    pub lifeline: Option<UnixStream>,
}

/// The host ends.
#[derive(Debug)]
pub enum HostSide {
    /// Plain descriptors (the caller's 0, 1, 2).
    Pipes { stdin: OwnedFd, stdout: OwnedFd, stderr: OwnedFd },
    /// A terminal, read for input and written with output; SIGWINCH means it was resized.
    Terminal { fd: OwnedFd },
}

/// What a detached relay is told on its command line: descriptor numbers it inherited.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChildArgs {
    pub target: Target,
    pub guest_stdin: Option<RawFd>,
    pub guest_stdout: Option<RawFd>,
    pub guest_stderr: Option<RawFd>,
    #[serde(default)]
    pub guest_lifeline: Option<RawFd>,
    /// A host pty slave (console-socket mode); otherwise fds 0-2 are the container's stdio.
    pub terminal_fd: Option<RawFd>,
    /// One byte here means the process exists (relay it); EOF means creation failed.
    pub control_fd: RawFd,
}

/// How the relayed process ended; `Lost` when the sandbox went away under it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Exited(i32),
    Signaled(i32),
    Lost,
}

impl Outcome {
    /// The shell convention: exit code, or 128 + signal; 255 for a lost sandbox.
    pub fn code(self) -> i32 {
        match self {
            Outcome::Exited(c) => c,
            Outcome::Signaled(s) => 128 + s,
            Outcome::Lost => 255,
        }
    }

    /// From what the guest reports, which is not trusted: a signal outside 1-64 or an exit
    /// code outside 0-255 is no status a process can have, and counts as a lost sandbox
    /// rather than reaching `raise` or `exit`.
    pub fn from_status(s: &pb::ExitStatus) -> Self {
        match (s.signal, s.exit_code) {
            (1..=64, _) => Outcome::Signaled(s.signal),
            (0, c @ 0..=255) => Outcome::Exited(c),
            (sig, code) => {
                tracing::warn!("the guest reported an impossible exit status (signal {sig}, code {code})");
                Outcome::Lost
            }
        }
    }
}

/// Copies until EOF; after a write error keeps reading and drops the data, so the guest side
/// never blocks on a reader that went away.
pub fn pump(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut sink_ok = true;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if sink_ok && to.write_all(&buf[..n]).and_then(|_| to.flush()).is_err() {
            sink_ok = false;
        }
    }
}

fn file(fd: OwnedFd) -> File {
    File::from(fd)
}

/// Starts the copy threads; returns a receiver that yields once per finished output stream.
fn start_pumps(
    host: &HostSide,
    guest: GuestStreams,
) -> Result<(std::sync::mpsc::Receiver<()>, usize), RuntimeError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(RuntimeError::io("dup host descriptor"));
    let (host_in, host_out, host_err) = match host {
        HostSide::Pipes { stdin, stdout, stderr } => (dup(stdin)?, dup(stdout)?, Some(dup(stderr)?)),
        HostSide::Terminal { fd } => (dup(fd)?, dup(fd)?, None),
    };
    if let Some(gin) = guest.stdin {
        let from = file(host_in);
        std::thread::spawn(move || {
            let mut g = &gin;
            pump(from, &mut g);
            // The process sees EOF after everything sent.
            let _ = gin.shutdown(std::net::Shutdown::Write);
        });
    }
    let mut outputs = 0;
    for (g, h) in [(guest.stdout, Some(host_out)), (guest.stderr, host_err)] {
        if let (Some(g), Some(h)) = (g, h) {
            outputs += 1;
            let tx = tx.clone();
            std::thread::spawn(move || {
                pump(&g, file(h));
                let _ = tx.send(());
            });
        }
    }
    Ok((rx, outputs))
}

/// Size of the terminal `fd`, if it is one with a size.
pub fn terminal_size(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain integers; all-zero is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ only writes a winsize into `ws`, which lives for the call; a bad fd
    // makes it fail, not misbehave.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
        Some((ws.ws_row, ws.ws_col))
    } else {
        None
    }
}

/// Relays until the process ends; returns how it ended.
pub async fn relay<A: Agent>(client: A, target: &Target, host: HostSide, mut guest: GuestStreams) -> Outcome {
    // Dropped only when this function returns (or the process holding it dies).
    let _lifeline = guest.lifeline.take();
    let pref = pb::ProcessRef { container_id: target.container_id.clone(), exec_id: target.exec_id.clone() };
    let (done_rx, outputs) = match start_pumps(&host, guest) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("relay {}: {e}", target.container_id);
            return Outcome::Lost;
        }
    };

    // Signal forwarding and resizes run beside the wait.
    let mut tasks = Vec::new();
    for sig in FORWARDED {
        let Ok(mut stream) = signal(SignalKind::from_raw(sig)) else { continue };
        let (pc, t) = (client.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            while stream.recv().await.is_some() {
                let req = pb::SignalProcessRequest {
                    container_id: t.container_id.clone(),
                    exec_id: t.exec_id.clone(),
                    signal: sig,
                    all: false,
                };
                if let Err(e) = pc.signal_process(req).await {
                    tracing::debug!("forwarding signal {sig}: {e}");
                }
            }
        }));
    }
    if let HostSide::Terminal { fd } = &host {
        let raw = fd.as_raw_fd();
        let (pc, t) = (client.clone(), target.clone());
        if let Ok(mut winch) = signal(SignalKind::window_change()) {
            tasks.push(tokio::spawn(async move {
                // Once at the start: the caller may have sized the terminal before we listened.
                let mut last = None;
                loop {
                    let size = terminal_size(raw);
                    if size.is_some() && size != last {
                        last = size;
                        if let Some((rows, cols)) = size {
                            let req = pb::ResizeTtyRequest {
                                container_id: t.container_id.clone(),
                                exec_id: t.exec_id.clone(),
                                rows: rows.into(),
                                cols: cols.into(),
                            };
                            if let Err(e) = pc.resize_tty(req).await {
                                tracing::debug!("resize: {e}");
                            }
                        }
                    }
                    if winch.recv().await.is_none() {
                        break;
                    }
                }
            }));
        }
    }

    let outcome = match client.wait_process(pref).await {
        Ok(s) => Outcome::from_status(&s),
        Err(e) => {
            tracing::warn!("relay {}/{}: wait: {e}", target.container_id, target.exec_id);
            Outcome::Lost
        }
    };
    for t in tasks {
        t.abort();
    }
    // Let output written just before the exit arrive.
    let drained = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + DRAIN_GRACE;
        for _ in 0..outputs {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                return false;
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    if !drained {
        tracing::debug!("relay {}: output still open {DRAIN_GRACE:?} after exit", target.container_id);
    }
    drop(host);
    outcome
}

/// Entry of `husk __relay ARGS-JSON`: a detached relay. Exits as the container process did.
pub fn child_main(args_json: &str) -> ! {
    let args: ChildArgs = match serde_json::from_str(args_json) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("husk __relay: bad arguments: {e}");
            std::process::exit(125);
        }
    };
    // SAFETY: the parent passed these descriptors to this process for exactly these roles and
    // nothing else in it owns them; each number is taken once.
    let take = |fd: Option<RawFd>| fd.map(|fd| unsafe { UnixStream::from_raw_fd(fd) });
    let guest = GuestStreams {
        stdin: take(args.guest_stdin),
        stdout: take(args.guest_stdout),
        stderr: take(args.guest_stderr),
        lifeline: take(args.guest_lifeline),
    };
    // SAFETY: the control pipe's read end, passed for this role alone and taken once.
    let mut control = unsafe { File::from_raw_fd(args.control_fd) };
    let host = match args.terminal_fd {
        Some(fd) => {
            // SAFETY: the pty slave, passed for this role alone and taken once.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            take_terminal(&fd);
            HostSide::Terminal { fd }
        }
        None => match stdio_fds() {
            Ok(h) => h,
            Err(e) => {
                eprintln!("husk __relay: {e}");
                std::process::exit(125);
            }
        },
    };
    let mut go = [0u8; 1];
    if !matches!(control.read(&mut go), Ok(1)) {
        // The container was never created: nothing to relay.
        std::process::exit(125);
    }
    drop(control);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("husk __relay: tokio: {e}");
            std::process::exit(125);
        }
    };
    let outcome = rt.block_on(async {
        match GrpcAgent::connect(&args.target.vsock, Duration::from_secs(30), None).await {
            Ok(client) => relay(client, &args.target, host, guest).await,
            Err(e) => {
                tracing::error!("relay: {e}");
                Outcome::Lost
            }
        }
    });
    mirror(outcome)
}

/// This process's fds 0-2 as the host side.
pub fn stdio_fds() -> Result<HostSide, RuntimeError> {
    let dup = |fd: RawFd| {
        nix::unistd::dup(fd)
            // SAFETY: dup returned a fresh descriptor that nothing else owns.
            .map(|d| unsafe { OwnedFd::from_raw_fd(d) })
            .map_err(RuntimeError::errno(format!("dup fd {fd}")))
    };
    Ok(HostSide::Pipes { stdin: dup(0)?, stdout: dup(1)?, stderr: dup(2)? })
}

/// Makes the pty slave this (new) session's controlling terminal, so resizes of its master
/// arrive as SIGWINCH, and raw: the guest's pty does the line discipline.
fn take_terminal(fd: &OwnedFd) {
    // SAFETY: setsid and TIOCSCTTY on a descriptor we own.
    unsafe {
        libc::setsid();
        libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0);
    }
    let _ = make_raw(fd);
}

/// Puts a terminal in raw mode; returns the previous settings.
pub fn make_raw(fd: &impl std::os::fd::AsFd) -> Result<nix::sys::termios::Termios, RuntimeError> {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let old = tcgetattr(fd).map_err(RuntimeError::errno("tcgetattr"))?;
    let mut raw = old.clone();
    cfmakeraw(&mut raw);
    tcsetattr(fd, SetArg::TCSANOW, &raw).map_err(RuntimeError::errno("tcsetattr"))?;
    Ok(old)
}

/// Ends this process the way the container process ended: the same exit code, or death by the
/// same signal (without a core file), so a parent's waitpid sees exactly what happened.
pub fn mirror(outcome: Outcome) -> ! {
    match outcome {
        Outcome::Exited(c) => std::process::exit(c),
        Outcome::Lost => std::process::exit(255),
        Outcome::Signaled(sig) => {
            // SAFETY: plain libc calls on this process; the signal number is 1-64
            // (checked in from_status).
            unsafe {
                let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                libc::signal(sig, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::raise(sig);
            }
            // Signals that do not kill (or cannot be raised) fall back to the shell convention.
            std::process::exit(128 + sig)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guests_exit_status_is_range_checked() {
        let st = |signal, exit_code| pb::ExitStatus { exit_code, signal, core_dumped: false };
        assert_eq!(Outcome::from_status(&st(0, 3)), Outcome::Exited(3));
        assert_eq!(Outcome::from_status(&st(9, 0)), Outcome::Signaled(9));
        for bad in [st(0, 256), st(0, -1), st(65, 0), st(-9, 0), st(i32::MAX, 0)] {
            assert_eq!(Outcome::from_status(&bad), Outcome::Lost, "{bad:?}");
        }
        assert_eq!(Outcome::Lost.code(), 255);
    }
}
