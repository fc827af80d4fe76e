//! Sandbox VMs: one detached `husk-vmm` per sandbox, which outlives the CLI call that started
//! it; its agent reached through the VMM's hybrid vsock socket.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use husk_proto as pb;

use crate::agent_client::AgentClient;
use crate::config::Config;
use crate::error::RuntimeError;
use crate::procinfo;
use crate::state::{SandboxRecord, StateDir};

/// The tag of the per-sandbox share that carries container rootfs and bind-mount sources.
pub const SHARE_TAG: &str = "husk";

/// The fd husk-vmm inherits the vsock socket's directory at, when the socket's path is too
/// long for `sun_path`.
const VSOCK_DIR_FD: i32 = 3;

/// How long a powered-off VMM gets to exit before it is killed.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Longest a single CLI request to the agent may take: a stalled guest gives an error, never
/// a hung command (or a lock held for ever).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(120);

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
}

/// The share directory of a sandbox on the host.
pub fn shared_dir(state: &StateDir, sid: &str) -> PathBuf {
    state.sandbox_dir(sid).join("shared")
}

/// The guest path of `rel` inside the sandbox share.
pub fn guest_path(rel: &Path) -> PathBuf {
    Path::new(pb::SHARES_DIR).join(SHARE_TAG).join(rel)
}

/// A VM this process started: the record plus, while this process lives, the child handle
/// (so a long-lived CLI such as `husk run` reaps its VMM).
pub struct Started {
    pub record: SandboxRecord,
    pub child: Option<Child>,
    pub client: AgentClient,
}

fn check_option_path(p: &Path) -> Result<&str, RuntimeError> {
    let s =
        p.to_str().ok_or_else(|| RuntimeError::InvalidArgument(format!("{} is not UTF-8", p.display())))?;
    if s.contains(',') {
        return Err(RuntimeError::InvalidArgument(format!("path {s:?} contains ','")));
    }
    Ok(s)
}

/// Boots a VM for sandbox `sid` (whose directory the caller holds locked), waits for its
/// agent, and prepares the guest. On error nothing is left running.
pub async fn start(
    cfg: &Config,
    state: &StateDir,
    sid: &str,
    shape: &VmShape,
) -> Result<Started, RuntimeError> {
    cfg.preflight()?;
    let dir = state.sandbox_dir(sid);
    let shared = shared_dir(state, sid);
    std::fs::create_dir_all(&shared).map_err(RuntimeError::io(format!("creating {}", shared.display())))?;
    let vsock = dir.join("vsock.sock");
    let _ = std::fs::remove_file(&vsock);
    let log_path = dir.join("vmm.log");
    let log = std::fs::File::create(&log_path)
        .map_err(RuntimeError::io(format!("creating {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(RuntimeError::io("dup vmm log"))?;

    // However long the state root makes the socket's path, husk-vmm binds it through its
    // directory, inherited as this fd.
    let (vsock_arg, vsock_dir) = crate::uds::inherited_path(&vsock, VSOCK_DIR_FD)
        .map_err(RuntimeError::io(format!("vsock socket {}", vsock.display())))?;
    let vsock_dir_fd = vsock_dir.as_ref().map(|d| d.as_raw_fd());
    let mut cmd = Command::new(&cfg.vmm);
    cmd.arg("--kernel")
        .arg(&cfg.kernel)
        .arg("--initramfs")
        .arg(&cfg.initramfs)
        .args(["--memory", &shape.memory_mib.to_string(), "--vcpus", &shape.vcpus.to_string()])
        .arg("--vsock")
        .arg(&vsock_arg)
        .arg("--fs")
        .arg(format!("tag={SHARE_TAG},path={}", check_option_path(&shared)?))
        .arg("--serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .args(["--cmdline", &cfg.cmdline]);
    for s in &shape.extra_shares {
        let ro = if s.read_only { ",ro" } else { "" };
        cmd.arg("--fs").arg(format!("tag={},path={}{ro}", s.tag, check_option_path(&s.path)?));
    }
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    // SAFETY: setsid, close_range, dup2 and fcntl are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // Its own session: a caller's Ctrl-C or hang-up must not take the sandbox down.
            libc::setsid();
            procinfo::cloexec_from_3();
            if let Some(fd) = vsock_dir_fd {
                let ok = if fd == VSOCK_DIR_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0) == 0
                } else {
                    libc::dup2(fd, VSOCK_DIR_FD) == VSOCK_DIR_FD
                };
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    drop(vsock_dir);
    let mut child = spawned.map_err(RuntimeError::io(format!("starting {}", cfg.vmm.display())))?;
    let pid = child.id() as i32;
    let record = SandboxRecord {
        id: sid.to_string(),
        vmm_pid: pid,
        vmm_start: procinfo::start_time(pid).unwrap_or(0),
        vsock: vsock.clone(),
        containers: Vec::new(),
    };
    match boot(&mut child, &record, cfg, shape, &log_path).await {
        Ok(client) => Ok(Started { record, child: Some(child), client }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

async fn boot(
    child: &mut Child,
    record: &SandboxRecord,
    cfg: &Config,
    shape: &VmShape,
    log: &Path,
) -> Result<AgentClient, RuntimeError> {
    let started = Instant::now();
    let connect = AgentClient::connect_with(&record.vsock, cfg.boot_timeout, Some(RPC_TIMEOUT));
    tokio::pin!(connect);
    let client = loop {
        tokio::select! {
            c = &mut connect => break c?,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if let Ok(Some(status)) = child.try_wait() {
                    let tail = std::fs::read_to_string(log).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                    return Err(RuntimeError::Vm(format!(
                        "husk-vmm exited ({status}) before its agent answered: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    )));
                }
            }
        }
    };
    tracing::debug!("sandbox {}: agent answered after {:?}", record.id, started.elapsed());
    let mut shares = vec![pb::Share { tag: SHARE_TAG.into(), read_only: false }];
    shares
        .extend(shape.extra_shares.iter().map(|s| pb::Share { tag: s.tag.clone(), read_only: s.read_only }));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
    client
        .sandbox
        .clone()
        .create_sandbox(pb::CreateSandboxRequest {
            hostname: shape.hostname.clone(),
            shares,
            unix_time_ns: now,
        })
        .await?;
    Ok(client)
}

/// Whether the sandbox's VMM still runs.
pub fn alive(rec: &SandboxRecord) -> bool {
    procinfo::alive(rec.vmm_pid, rec.vmm_start)
}

/// Connects to a running sandbox's agent.
pub async fn connect(rec: &SandboxRecord) -> Result<AgentClient, RuntimeError> {
    if !alive(rec) {
        return Err(RuntimeError::Vm(format!("the VM of sandbox {} is not running", rec.id)));
    }
    Ok(AgentClient::connect_with(&rec.vsock, Duration::from_secs(10), Some(RPC_TIMEOUT)).await?)
}

/// Connects for calls that last as long as a process: no per-call timeout.
pub async fn connect_long(vsock: &Path) -> Result<AgentClient, RuntimeError> {
    Ok(AgentClient::connect(vsock, Duration::from_secs(30)).await?)
}

/// Powers the VM off (or kills it), waits for the VMM to go, and removes the sandbox's files.
/// The caller holds the sandbox lock and has unmounted everything under the share.
pub async fn destroy(
    state: &StateDir,
    rec: &SandboxRecord,
    mut child: Option<Child>,
) -> Result<(), RuntimeError> {
    if alive(rec) {
        match AgentClient::connect_with(&rec.vsock, Duration::from_secs(5), Some(RPC_TIMEOUT)).await {
            Ok(c) => {
                if let Err(e) = c.sandbox.clone().destroy_sandbox(pb::Empty {}).await {
                    tracing::warn!("sandbox {}: DestroySandbox: {}", rec.id, e.message());
                }
            }
            Err(e) => tracing::warn!("sandbox {}: agent unreachable, killing the VM: {e}", rec.id),
        }
        let deadline = Instant::now() + EXIT_WAIT;
        while alive(rec) && Instant::now() < deadline {
            if let Some(c) = child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if procinfo::signal(rec.vmm_pid, rec.vmm_start, nix::sys::signal::Signal::SIGKILL) {
            tracing::warn!("sandbox {}: husk-vmm did not exit after power-off; killed", rec.id);
        }
    }
    if let Some(mut c) = child {
        let _ = c.wait();
    }
    remove_files(state, &rec.id)
}

/// Removes a sandbox directory whose VM is gone. Refuses while anything is still mounted under
/// its share: removing through a bind mount would delete the user's files.
pub fn remove_files(state: &StateDir, sid: &str) -> Result<(), RuntimeError> {
    let dir = state.sandbox_dir(sid);
    let shared = shared_dir(state, sid);
    if let Some(m) = crate::mounts::first_mount_under(&shared)? {
        return Err(RuntimeError::Internal(format!(
            "not removing sandbox {sid}: {} is still mounted",
            m.display()
        )));
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::Io { what: format!("removing {}", dir.display()), source: e }),
    }
}
