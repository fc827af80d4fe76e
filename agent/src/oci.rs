//! libcontainer operations, each run in a short-lived child process of the agent
//! (`husk-agent __oci <op-json>`).
//!
//! libcontainer forks (clone3) from the calling thread and then allocates and takes locks in the
//! child; doing that from the agent's multithreaded async runtime could deadlock the child on a
//! lock another thread held at fork time. A fresh single-threaded process per operation is what
//! the youki CLI is, and keeps libcontainer's own waitpid calls away from the agent's reaper.
//! The helper's fds 0–2 become the container process's stdio; it reports on fd 3.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;

use crate::error::AgentError;
use crate::reaper::{self, Reaper};

/// The fd the helper writes its one-line JSON report to.
const REPORT_FD: i32 = 3;
/// How long a report may lag behind the helper's exit.
const REPORT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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
    },
    Start {
        root: PathBuf,
        id: String,
    },
    /// Runs the OCI process in `process_json` inside the running container.
    Exec {
        root: PathBuf,
        id: String,
        process_json: PathBuf,
        console_socket: Option<PathBuf>,
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

/// Runs `op` in a helper with `stdio` as its fds 0–2; returns the PID it reports.
pub async fn run(reaper: &Arc<Reaper>, op: Op, stdio: [OwnedFd; 3]) -> Result<Option<i32>, AgentError> {
    let op_json =
        serde_json::to_string(&op).map_err(|e| AgentError::Internal(format!("encoding op: {e}")))?;
    // Not current_exe(): after init leaves the initramfs, the binary's path is unreachable, but
    // the magic link still execs the same file.
    let exe = "/proc/self/exe";
    let (report_r, report_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(AgentError::errno("pipe"))?;
    let [stdin, stdout, stderr] = stdio;
    let report_w_fd = report_w.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg("__oci")
        .arg(&op_json)
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    // SAFETY: dup2 is async-signal-safe; it runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(report_w_fd, REPORT_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(AgentError::io("starting the container helper"))?;
    tracing::debug!("helper {} runs {op_json}", child.id());
    let exit = reaper.watch(child.id() as i32);
    drop(report_w);
    // The report line comes before the helper exits, but the container (which inherits the pipe
    // until it execs) may hold the write end much longer: never wait for EOF. A helper that dies
    // without reporting (killed, or aborted on a panic) is caught by its exit.
    let pipe =
        tokio::net::unix::pipe::Receiver::from_owned_fd(report_r).map_err(AgentError::io("report pipe"))?;
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
        Some(e) => Err(AgentError::FailedPrecondition(e)),
        None => Ok(report.pid),
    }
}

/// The helper process: performs the op and reports. Never returns.
pub fn helper_main(op_json: &str) -> ! {
    let result = serde_json::from_str::<Op>(op_json).map_err(|e| format!("bad op: {e}")).and_then(perform);
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

fn load(root: &std::path::Path, id: &str) -> Result<Container, String> {
    Container::load(root.join(id)).map_err(|e| format!("container {id}: {e}"))
}

fn perform(op: Op) -> Result<Option<i32>, String> {
    match op {
        Op::Create { root, id, bundle, console_socket, no_pivot } => {
            let container = ContainerBuilder::new(id.clone(), SyscallType::Linux)
                .with_root_path(root)
                .map_err(|e| e.to_string())?
                .with_console_socket(console_socket)
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .with_no_pivot(no_pivot)
                .build()
                .map_err(|e| format!("creating container {id}: {e}"))?;
            Ok(container.pid().map(|p| p.as_raw()))
        }
        Op::Start { root, id } => {
            load(&root, &id)?.start().map_err(|e| format!("starting container {id}: {e}"))?;
            Ok(None)
        }
        Op::Exec { root, id, process_json, console_socket } => {
            let pid = ContainerBuilder::new(id.clone(), SyscallType::Linux)
                .with_root_path(root)
                .map_err(|e| e.to_string())?
                .with_console_socket(console_socket)
                .as_tenant()
                .with_process(Some(process_json))
                .with_detach(true)
                .build()
                .map_err(|e| format!("exec in container {id}: {e}"))?;
            Ok(Some(pid.as_raw()))
        }
        Op::Delete { root, id, force } => {
            load(&root, &id)?.delete(force).map_err(|e| format!("deleting container {id}: {e}"))?;
            Ok(None)
        }
    }
}
