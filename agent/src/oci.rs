//! libcontainer operations, each run in a short-lived child process of the agent
//! (`husk-agent __oci <op-json>`).
//!
//! libcontainer forks (clone3) from the calling thread and then allocates and takes locks in the
//! child; doing that from the agent's multithreaded async runtime could deadlock the child on a
//! lock another thread held at fork time. A fresh single-threaded process per operation is what
//! the youki CLI is, and keeps libcontainer's own waitpid calls away from the agent's reaper.
//! The helper's fds 0–2 become the container process's stdio; it reports on fd 3, and the
//! container library's own error logs (from the helper and the processes it forks, which name
//! the mount, path, syscall and errno that failed) go to fd 4, so a failure keeps its cause.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::notify_socket::NOTIFY_FILE;
use libcontainer::syscall::syscall::SyscallType;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;

use crate::confine::ConfinedExec;
use crate::error::AgentError;
use crate::reaper::{self, ExitWatch, Reaper};

/// The fd the helper writes its one-line JSON report to.
const REPORT_FD: i32 = 3;
/// The fd the helper's error logs go to.
const LOG_FD: i32 = 4;
/// Most log text kept for an error message.
const MAX_LOG: usize = 4096;
/// How long a report may lag behind the helper's exit.
const REPORT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// Where a fault point that fired leaves its marker (see [`fault_point`]).
const FAULT_MARKER_DIR: &str = "/run";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Creates the container from `bundle` (its init waits for Start).
    Create {
        root: PathBuf,
        id: String,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
        no_pivot: bool,
        /// How the container's process is started (its seccomp profile, taken out of the spec).
        start: Box<ConfinedExec>,
        /// Bind mounts whose propagation the helper sets itself: (destination, mode).
        propagation: Vec<(PathBuf, String)>,
        /// Start the init once it is created (see [`start`]).
        #[serde(default)]
        start_now: bool,
    },
    /// Runs the OCI process in `process_json` inside the running container.
    Exec {
        root: PathBuf,
        id: String,
        process_json: PathBuf,
        console_socket: Option<PathBuf>,
        /// The container's profile, which libcontainer would not give the exec, and the
        /// process's own capability sets when they were lifted to load it.
        start: Box<ConfinedExec>,
    },
    Delete {
        root: PathBuf,
        id: String,
        force: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    pid: Option<i32>,
    error: Option<String>,
}

/// The fd a parked helper waits for its op on (see [`crate::spare`]).
pub(crate) const CONTROL_FD: i32 = 5;

impl Op {
    pub(crate) fn encode(&self) -> Result<String, AgentError> {
        serde_json::to_string(self).map_err(|e| AgentError::Internal(format!("encoding op: {e}")))
    }
}

/// A helper started and not yet finished: its PID, its exit, and the read ends of its report
/// and log pipes.
pub(crate) struct Launched {
    pub pid: i32,
    exit: ExitWatch,
    report: OwnedFd,
    log: OwnedFd,
}

/// Starts `husk-agent ARGS` with `stdio` as its fds 0–2, its report and log pipes at
/// [`REPORT_FD`] and [`LOG_FD`], and `control` (if any) at [`CONTROL_FD`]. It runs under the
/// calling thread's scheduling policy.
pub(crate) fn launch(
    reaper: &Reaper,
    args: &[&str],
    stdio: [Stdio; 3],
    control: Option<&OwnedFd>,
) -> Result<Launched, AgentError> {
    // Not current_exe(): after init leaves the initramfs, the binary's path is unreachable, but
    // the magic link still execs the same file.
    let exe = "/proc/self/exe";
    let (report_r, report_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(AgentError::errno("pipe"))?;
    let (log_r, log_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(AgentError::errno("pipe"))?;
    let [stdin, stdout, stderr] = stdio;
    // Above every fd the child is given, so no dup2 below overwrites another's source (or
    // is a no-op that leaves the fd close-on-exec).
    let report_w = above_targets(&report_w)?;
    let log_w = above_targets(&log_w)?;
    let control = control.map(above_targets).transpose()?;
    let report_w_fd = report_w.as_raw_fd();
    let log_w_fd = log_w.as_raw_fd();
    let control_fd = control.as_ref().map(|c| c.as_raw_fd());
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(stdin).stdout(stdout).stderr(stderr);
    // SAFETY: dup2 is async-signal-safe; it runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(report_w_fd, REPORT_FD) < 0 || libc::dup2(log_w_fd, LOG_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = control_fd {
                if libc::dup2(fd, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(AgentError::io("starting the container helper"))?;
    let pid = child.id() as i32;
    let exit = reaper.watch(pid);
    Ok(Launched { pid, exit, report: report_r, log: log_r })
}

/// A close-on-exec duplicate of `fd` numbered above [`CONTROL_FD`].
fn above_targets(fd: &OwnedFd) -> Result<OwnedFd, AgentError> {
    let dup = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(CONTROL_FD + 1))
        .map_err(AgentError::errno("duplicating a helper fd"))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) })
}

/// Runs `op` in a fresh helper with `stdio` as its fds 0–2; returns the PID it reports.
pub(crate) async fn run_fresh(
    reaper: &Reaper,
    op_json: &str,
    stdio: [OwnedFd; 3],
) -> Result<Option<i32>, AgentError> {
    let launched = launch(reaper, &["__oci", op_json], stdio.map(Stdio::from), None)?;
    tracing::debug!("helper {} runs {op_json}", launched.pid);
    finish(launched).await
}

/// Waits for a launched helper's report; returns the PID it reports.
pub(crate) async fn finish(helper: Launched) -> Result<Option<i32>, AgentError> {
    let Launched { exit, report, log, .. } = helper;
    // The report line comes before the helper exits, but the container (which inherits the pipe
    // until it execs) may hold the write end much longer: never wait for EOF. A helper that dies
    // without reporting (killed, or aborted on a panic) is caught by its exit.
    let pipe =
        tokio::net::unix::pipe::Receiver::from_owned_fd(report).map_err(AgentError::io("report pipe"))?;
    let mut reader = tokio::io::BufReader::new(pipe);
    let mut line = String::new();
    let status = tokio::select! {
        r = reader.read_line(&mut line) => {
            r.map_err(AgentError::io("reading the helper report"))?;
            reaper::wait(exit).await
        }
        status = reaper::wait(exit.clone()) => {
            // Whatever it reported is in the pipe already.
            let _ = tokio::time::timeout(REPORT_GRACE, reader.read_line(&mut line)).await;
            status
        }
    };
    tracing::debug!("helper report {:?}, exit {status:?}", line.trim_end());
    let report: Report = serde_json::from_str(&line)
        .map_err(|_| AgentError::Internal(format!("container helper ended ({status:?}) without a report")))?;
    match report.error {
        // Logged before the failure was reported, so in the pipe already; never wait for EOF
        // (a created container holds the pipe until it execs).
        Some(e) => Err(AgentError::FailedPrecondition(with_cause(e, &drain(&log)))),
        None => Ok(report.pid),
    }
}

/// Whatever the log pipe holds now, up to [`MAX_LOG`] bytes.
fn drain(fd: &OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while out.len() < MAX_LOG {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(n @ 1..) => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    out.truncate(MAX_LOG);
    String::from_utf8_lossy(&out).into_owned()
}

/// The helper's error plus the library's own error lines (innermost first, as logged), each
/// once: "creating container x: failed to prepare rootfs: <mount>: <errno> | ...".
fn with_cause(error: String, log: &str) -> String {
    let mut causes: Vec<&str> = Vec::new();
    for line in log.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !causes.contains(&line) && !error.contains(line) {
            causes.push(line);
        }
    }
    if causes.is_empty() {
        error
    } else {
        format!("{error}: {}", causes.join(" | "))
    }
}

/// Sends the container library's error events to [`LOG_FD`], one line each, never blocking
/// (a full pipe drops lines). Inherited by the processes libcontainer forks; closed at their
/// exec, so a container never sees it.
fn init_error_log() {
    // SAFETY: fcntl on the fd the agent set up for this helper.
    if unsafe { libc::fcntl(LOG_FD, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return;
    }
    struct LogPipe;
    impl std::io::Write for LogPipe {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            // SAFETY: LOG_FD is open for this process's lifetime; a failed write is dropped.
            let _ = unsafe { libc::write(LOG_FD, buf.as_ptr().cast(), buf.len()) };
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::ERROR)
        .with_writer(|| LogPipe)
        .with_ansi(false)
        .without_time()
        .with_level(false)
        .with_target(false)
        .try_init();
}

/// The helper process: performs the op and reports. Never returns.
pub fn helper_main(op_json: &str) -> ! {
    init_error_log();
    let result = serde_json::from_str::<Op>(op_json).map_err(|e| format!("bad op: {e}")).and_then(perform);
    finish_helper(result)
}

/// Writes the helper's report and exits.
pub(crate) fn finish_helper(result: Result<Option<i32>, String>) -> ! {
    let report = match result {
        Ok(pid) => Report { pid, error: None },
        Err(error) => Report { pid: None, error: Some(error) },
    };
    let mut line = serde_json::to_string(&report).unwrap_or_else(|_| r#"{"error":"report encoding"}"#.into());
    line.push('\n');
    // SAFETY: fd 3 was set up by the agent for this report and is not used otherwise.
    let _ = nix::unistd::write(unsafe { std::os::fd::BorrowedFd::borrow_raw(REPORT_FD) }, line.as_bytes());
    std::process::exit(if report.error.is_some() { 1 } else { 0 });
}

/// Test hook: `husk.fault=POINT[@ID][,POINT[@ID]...]` on the guest kernel's command line (husk's
/// `HUSK_CMDLINE`) makes the helper SIGKILL itself at POINT, for container ID only if one is
/// given, once per boot, so a test sees what a helper dying there leaves behind. Points:
/// `oci-create` (before libcontainer builds the container), `oci-created` (after, before the
/// report), `oci-exec`, `oci-delete`; and `oci-start`, where the agent (which starts
/// containers itself) fails the start instead. Without the parameter nothing changes.
fn fault_point(point: &str, id: &str) {
    if fault_fires(point, id) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Whether the test hook names `point` (for `id`) and has not fired at it this boot yet.
fn fault_fires(point: &str, id: &str) -> bool {
    let Ok(cmdline) = std::fs::read_to_string("/proc/cmdline") else { return false };
    let Some(list) = cmdline.split_whitespace().find_map(|a| a.strip_prefix("husk.fault=")) else {
        return false;
    };
    let hit = list.split(',').find(|f| match f.split_once('@') {
        Some((p, i)) => p == point && i == id,
        None => *f == point,
    });
    let Some(hit) = hit else { return false };
    // Once per boot: a retry of the same step must be able to succeed.
    let marker = std::path::Path::new(FAULT_MARKER_DIR).join(format!("husk-fault-{hit}"));
    std::fs::OpenOptions::new().write(true).create_new(true).open(marker).is_ok()
}

/// Starts created container `id` without a helper of its own: from the agent, or from the
/// helper that created it when the create starts it too. Starting forks nothing (the host runs
/// the OCI hooks; none reach the guest), and a helper's exec was most of a start's time.
/// libcontainer's own `start` reaches the init's notify socket by changing the process's
/// working directory, which a multithreaded agent must not do; this reaches it through a
/// descriptor of the container's state directory (a short path, whatever the root's length).
/// Blocking: call from a blocking thread.
pub fn start(root: &std::path::Path, id: &str) -> Result<(), AgentError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let failed = |e: String| AgentError::FailedPrecondition(format!("starting container {id}: {e}"));
    // Test hook: the start fails before the init hears of it (`oci-start`, see fault_point).
    if fault_fires("oci-start", id) {
        return Err(failed("fault injected at oci-start".into()));
    }
    let dir = root.join(id);
    let mut container = Container::load(dir.clone()).map_err(|e| failed(e.to_string()))?;
    container.refresh_status().map_err(|e| failed(e.to_string()))?;
    if !container.can_start() {
        return Err(failed(format!("it is {}", container.status())));
    }
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(&dir)
        .map_err(AgentError::io(format!("opening {}", dir.display())))?;
    let sock = format!("/proc/self/fd/{}/{NOTIFY_FILE}", d.as_raw_fd());
    // The init reads to end of stream: the connection closes when `s` drops.
    let mut s = std::os::unix::net::UnixStream::connect(&sock)
        .map_err(AgentError::io(format!("container {id}: connecting to its init")))?;
    s.write_all(b"start container").map_err(AgentError::io(format!("container {id}: starting its init")))?;
    drop(s);
    container.set_status(ContainerStatus::Running).save().map_err(|e| failed(e.to_string()))?;
    Ok(())
}

fn load(root: &std::path::Path, id: &str) -> Result<Container, String> {
    Container::load(root.join(id)).map_err(|e| format!("container {id}: {e}"))
}

fn perform(op: Op) -> Result<Option<i32>, String> {
    match op {
        Op::Create { root, id, bundle, console_socket, no_pivot, start, propagation, start_now } => {
            fault_point("oci-create", &id);
            let mut container = ContainerBuilder::new(id.clone(), SyscallType::Linux)
                .with_root_path(root.clone())
                .map_err(|e| e.to_string())?
                .with_console_socket(console_socket)
                .with_executor(*start)
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .with_no_pivot(no_pivot)
                .build()
                .map_err(|e| format!("creating container {id}: {e}"))?;
            fault_point("oci-created", &id);
            let pid = container.pid().map(|p| p.as_raw());
            let started = match pid {
                Some(pid) => crate::propagation::apply(pid, &propagation)
                    .map_err(|e| format!("creating container {id}: {e}"))
                    .and_then(|()| {
                        if start_now {
                            self::start(&root, &id).map_err(|e| e.to_string())
                        } else {
                            Ok(())
                        }
                    }),
                None => Ok(()),
            };
            if let Err(e) = started {
                // Nothing half-made stays behind.
                let _ = container.delete(true);
                return Err(e);
            }
            Ok(pid)
        }
        Op::Exec { root, id, process_json, console_socket, start } => {
            fault_point("oci-exec", &id);
            let pid = ContainerBuilder::new(id.clone(), SyscallType::Linux)
                .with_root_path(root)
                .map_err(|e| e.to_string())?
                .with_console_socket(console_socket)
                .with_executor(*start)
                .as_tenant()
                .with_process(Some(process_json))
                .with_detach(true)
                .build()
                .map_err(|e| format!("exec in container {id}: {e}"))?;
            Ok(Some(pid.as_raw()))
        }
        Op::Delete { root, id, force } => {
            fault_point("oci-delete", &id);
            load(&root, &id)?.delete(force).map_err(|e| format!("deleting container {id}: {e}"))?;
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_the_librarys_cause_once() {
        let log = "failed to create dir err=Nix(ENOTDIR) path=\"/r/etc/passwd/x\"\n\
                   failed to prepare rootfs err=Mount(...)\n\
                   failed to create dir err=Nix(ENOTDIR) path=\"/r/etc/passwd/x\"\n";
        let e = with_cause("creating container c: failed to prepare rootfs".into(), log);
        assert!(e.starts_with("creating container c: failed to prepare rootfs: "), "{e}");
        assert_eq!(e.matches("ENOTDIR").count(), 1, "{e}");
        assert!(e.contains("/r/etc/passwd/x"), "{e}");
        assert_eq!(with_cause("plain".into(), "\n"), "plain");
    }
}
