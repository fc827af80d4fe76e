//! Sandbox VMs as detached `husk-vmm` processes, which outlive the CLI call that started them.
//! Each gets its whole description as a `VmConfig` JSON file (husk-vmm's own schema), so any
//! path works and every limit is husk-vmm's; its agent is reached through the VMM's hybrid
//! vsock socket.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use husk_proto as pb;
use husk_vmm::config::{
    FsCache, FsShareConfig, JailConfig, LoopbackForward, MacAddr, NetConfig, SerialConfig, VmConfig,
    VsockConfig, DEFAULT_JAIL_NOFILE,
};

use super::snapshot;
use super::spawn::{spawn, Spawn};
use super::{cgroup, Booted, Calls, PowerOff, VmExit, VmProcess, VmShape, Vms};
use crate::agent::{Agent, GrpcAgent};
use crate::config::Config;
use crate::error::RuntimeError;
use crate::share::{self, SHARE_TAG};
use crate::state::{SandboxRecord, StateDir, WorkingSetRecording};
use crate::{procinfo, uds};

/// The fd husk-vmm inherits the vsock socket's directory at, when the socket's path is too
/// long for `sun_path`.
const VSOCK_DIR_FD: i32 = 3;

/// Longest a restored VM's agent gets to answer before husk boots the sandbox cold instead.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a powered-off VMM gets to exit before it is killed.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Longest a single request to the agent may take on a [`Calls::Bounded`] connection: a
/// stalled guest gives an error, never a hung command (or a lock held for ever).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(120);

/// Agent connections this process keeps, per VM (vsock socket, VMM pid and start time), when
/// [`share_connections`] asked for it: a CLI call then dials each agent at most once, whatever
/// its steps (boot, status, start, relay, delete, power-off). Off, each step dials its own.
type Shared = HashMap<(PathBuf, i32, u64), GrpcAgent>;
static SHARED: Mutex<Option<Shared>> = Mutex::new(None);

/// Most VMs a process keeps connections to: past it they are all dropped (and dialled again
/// when needed), so a caller that meets many VMs holds a bounded number of sockets.
const SHARED_MAX: usize = 16;

/// One agent connection per VM for the rest of this (short-lived) process: for the CLI.
pub fn share_connections() {
    SHARED.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashMap::new);
}

fn shared_key(rec: &SandboxRecord) -> (PathBuf, i32, u64) {
    (rec.vsock.clone(), rec.vmm_pid, rec.vmm_start)
}

fn shared(rec: &SandboxRecord) -> Option<GrpcAgent> {
    SHARED.lock().unwrap_or_else(|p| p.into_inner()).as_ref()?.get(&shared_key(rec)).cloned()
}

/// Keeps `agent` for `rec` if connections are shared; whether they are.
fn keep_shared(rec: &SandboxRecord, agent: &GrpcAgent) -> bool {
    let mut g = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    let Some(map) = g.as_mut() else { return false };
    if map.len() >= SHARED_MAX {
        map.clear();
    }
    map.insert(shared_key(rec), agent.clone());
    true
}

fn forget_shared(rec: &SandboxRecord) {
    if let Some(map) = SHARED.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        map.remove(&shared_key(rec));
    }
}

fn call_timeout(calls: Calls) -> Option<Duration> {
    match calls {
        Calls::Bounded => Some(RPC_TIMEOUT),
        Calls::Long => None,
    }
}

/// The husk-vmm backend.
#[derive(Debug, Clone)]
pub struct HuskVmm {
    pub cfg: Config,
}

/// How a VM's virtio-net devices look to its guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nics {
    /// Each on its pod interface's tap, with that interface's MAC and MTU (a cold boot).
    Own,
    /// As a snapshot holds them, on the pod interfaces' taps: the placeholder MAC of each
    /// device's place and no MTU. The agent gives the guest's links the pod's MACs and MTUs.
    Snapshot,
    /// A snapshot template's: this many devices with their placeholders, detached.
    Template(usize),
}

/// husk-vmm's description of a sandbox VM whose vsock socket husk-vmm reaches as `vsock_arg`.
pub(crate) fn vm_config(cfg: &Config, dir: &Path, shape: &VmShape, vsock_arg: &Path, nics: Nics) -> VmConfig {
    let jail =
        cfg.confinement.jail.then(|| JailConfig { root: dir.join("jail"), nofile: DEFAULT_JAIL_NOFILE });
    let mut fs = vec![FsShareConfig {
        tag: SHARE_TAG.into(),
        path: dir.join("shared"),
        read_only: false,
        cache: FsCache::default(),
    }];
    fs.extend(shape.extra_shares.iter().map(|s| FsShareConfig {
        tag: s.tag.clone(),
        path: s.path.clone(),
        read_only: s.read_only,
        cache: FsCache::default(),
    }));
    VmConfig {
        kernel: cfg.kernel.clone(),
        initramfs: Some(cfg.initramfs.clone()),
        cmdline: cfg.cmdline.clone(),
        memory_mib: shape.memory_mib.into(),
        vcpus: shape.vcpus,
        serial: SerialConfig::File(dir.join("console.log")),
        rng: true,
        fs,
        vsock: Some(VsockConfig { uds_path: vsock_arg.to_path_buf(), guest_cid: 3 }),
        // The taps wired to the pod's interfaces: husk-vmm runs in that namespace (see `boot`).
        net: net_devices(shape, nics),
        // The pod's loopback, which the REDIRECT rule sends to this listener, into the guest.
        loopback_forward: shape
            .network
            .as_ref()
            .and_then(|w| w.loopback_forward)
            .map(|listen_port| LoopbackForward { listen_port, guest_port: husk_proto::STDIO_PORT }),
        jail,
        seccomp: cfg.confinement.seccomp,
    }
}

fn net_devices(shape: &VmShape, nics: Nics) -> Vec<NetConfig> {
    let links = shape.network.iter().flat_map(|w| &w.links);
    let placeholder = |i| Some(MacAddr(snapshot::placeholder_mac(i)));
    match nics {
        Nics::Own => links
            .map(|l| NetConfig {
                tap: Some(l.tap.clone()),
                mac: Some(MacAddr(l.mac)),
                mtu: u16::try_from(l.mtu).ok(),
            })
            .collect(),
        Nics::Snapshot => links
            .enumerate()
            .map(|(i, l)| NetConfig { tap: Some(l.tap.clone()), mac: placeholder(i), mtu: None })
            .collect(),
        Nics::Template(n) => {
            (0..n).map(|i| NetConfig { tap: None, mac: placeholder(i), mtu: None }).collect()
        }
    }
}

/// Where a cold guest's agent announces it serves: the VMM forwards the guest's connection to
/// its host port [`pb::READY_PORT`] to `<vsock socket>_<port>`.
fn ready_socket(vsock: &Path) -> PathBuf {
    let mut p = vsock.as_os_str().to_owned();
    p.push(format!("_{}", pb::READY_PORT));
    PathBuf::from(p)
}

/// The sandbox directory of a record: its vsock socket lives in `<dir>/vsock/`.
fn sandbox_dir_of(rec: &SandboxRecord) -> Option<PathBuf> {
    let parent = rec.vsock.parent()?;
    if parent.file_name() == Some(OsStr::new("vsock")) {
        parent.parent().map(Path::to_path_buf)
    } else {
        Some(parent.to_path_buf())
    }
}

/// Why a VMM ended other than by the guest powering off, in words, with its last log line
/// that says so (the seccomp report names the thread and the syscall).
pub fn death_report(exit: VmExit, log: &str) -> Option<String> {
    let last = log.lines().rev().find(|l| l.starts_with("husk-vmm:")).map(str::trim);
    let what = match exit {
        VmExit::Code(0) => return None,
        VmExit::Signal(libc::SIGSYS) => "killed by SIGSYS (a syscall outside its seccomp filter)".to_string(),
        VmExit::Signal(libc::SIGKILL) => {
            "killed by SIGKILL (by husk, or the kernel out of memory)".to_string()
        }
        VmExit::Signal(n) => format!("killed by signal {n}"),
        VmExit::Code(n) => format!("exited with status {n}"),
    };
    Some(match last {
        Some(l) => format!("husk-vmm {what}: {l}"),
        None => format!("husk-vmm {what}"),
    })
}

impl HuskVmm {
    /// Asks the agent to destroy the sandbox (kill what runs, sync the shares); whether it
    /// answered. The agent powers off moments after it answers; an answer lost to that is no
    /// failure: the VMM's exit, awaited by the caller, is what counts.
    async fn destroy_in_guest(&self, rec: &SandboxRecord, kept: Option<GrpcAgent>) -> bool {
        let agent = match kept {
            Some(a) => Ok(a.with_call_timeout(Some(RPC_TIMEOUT))),
            None => GrpcAgent::connect(&rec.vsock, Duration::from_secs(5), Some(RPC_TIMEOUT)).await,
        };
        match agent {
            Ok(c) => match c.destroy_sandbox().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!("sandbox {}: {e}", rec.id);
                    false
                }
            },
            Err(e) => {
                tracing::warn!("sandbox {}: agent unreachable, killing the VM: {e}", rec.id);
                false
            }
        }
    }

    async fn wait_for_agent(
        &self,
        process: &mut VmProcess,
        record: &SandboxRecord,
        shape: &VmShape,
        log: &Path,
        spawn_ns: u64,
        ready: Option<tokio::net::UnixListener>,
    ) -> Result<GrpcAgent, RuntimeError> {
        let restored = ready.is_none();
        let started = Instant::now();
        // A restored agent is up at once; one that is not soon is better booted cold.
        let wait = if restored { self.cfg.boot_timeout.min(RESTORE_TIMEOUT) } else { self.cfg.boot_timeout };
        let connect = async {
            if restored {
                // Its template's agent passed the health check, and the snapshot's key holds
                // the initramfs it came from: the connection is all a restored VM needs.
                GrpcAgent::connect(&record.vsock, wait, Some(RPC_TIMEOUT)).await
            } else {
                GrpcAgent::connect_when_ready(&record.vsock, wait, Some(RPC_TIMEOUT), ready).await
            }
        };
        tokio::pin!(connect);
        let agent = loop {
            tokio::select! {
                c = &mut connect => break c?,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    // A caller that reaps every child (a shim) leaves `exited` nothing to see.
                    // Liveness first: a VMM that dies between the two checks is then seen gone,
                    // and waited for until it can be reaped, so how it ended (SIGSYS, a
                    // status) is known.
                    let gone = !procinfo::alive(record.vmm_pid, record.vmm_start);
                    let exit = match process.try_wait() {
                        None if gone => process.wait_gone(Duration::from_secs(2)).await,
                        e => e,
                    };
                    if exit.is_some() || gone {
                        let text = std::fs::read_to_string(log).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(5).collect();
                        let tail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
                        let how = exit.and_then(|e| death_report(e, "")).unwrap_or_else(|| "husk-vmm exited".into());
                        return Err(RuntimeError::Vm(format!("{how} before its agent answered: {tail}")));
                    }
                }
            }
        };
        tracing::debug!("sandbox {}: agent answered after {:?}", record.id, started.elapsed());
        if crate::timeline::enabled() {
            // The VMM's own points (`--timings`), then the guest's.
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let now = crate::timeline::now_ns();
            let mut first_entry = spawn_ns;
            for (name, at) in crate::timeline::vmm_points(&text, spawn_ns, now) {
                if name.contains("first vCPU entry") {
                    first_entry = at;
                }
                crate::timeline::mark_at(&name, at);
            }
            // A restored guest's boot and readiness happened in the template, long ago.
            if let Some(g) = agent.guest_clock().filter(|_| !restored) {
                g.mark(first_entry);
            }
        }
        let mut shares = vec![pb::Share { tag: SHARE_TAG.into(), read_only: false }];
        shares.extend(
            shape.extra_shares.iter().map(|s| pb::Share { tag: s.tag.clone(), read_only: s.read_only }),
        );
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
        let (mut interfaces, routes) = shape.network.as_ref().map(|w| w.to_proto()).unwrap_or_default();
        if restored {
            // Its devices have the snapshot's placeholder MACs (see `Nics::Snapshot`).
            for (i, iface) in interfaces.iter_mut().enumerate() {
                iface.device_mac = snapshot::placeholder_mac(i).to_vec();
            }
        }
        agent
            .create_sandbox(pb::CreateSandboxRequest {
                hostname: shape.hostname.clone(),
                shares,
                unix_time_ns: now,
                interfaces,
                routes,
                // The guest reseeds its RNG from these: sandboxes restored from one snapshot
                // would otherwise share its state. getrandom(2) fills 32 bytes in one call.
                entropy: {
                    let mut b = vec![0u8; 32];
                    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
                    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
                    if n != 32 {
                        let e = std::io::Error::last_os_error();
                        tracing::warn!("getrandom for the guest's entropy: {e}");
                        b.clear();
                    }
                    b
                },
            })
            .await?;
        crate::fault::point("agent-connected");
        Ok(agent)
    }
}

/// A failed VM start, with how its VMM ended if it did.
#[derive(Debug)]
struct LaunchError {
    error: RuntimeError,
    exit: Option<VmExit>,
}

impl From<RuntimeError> for LaunchError {
    fn from(error: RuntimeError) -> Self {
        Self { error, exit: None }
    }
}

impl HuskVmm {
    /// Starts a sandbox VM, cold or from the snapshot in `restore`, and waits for its agent.
    async fn launch(
        &self,
        state: &StateDir,
        sid: &str,
        shape: &VmShape,
        restore: Option<&Path>,
    ) -> Result<Booted<GrpcAgent>, LaunchError> {
        let cfg = &self.cfg;
        let dir = state.sandbox_dir(sid);
        let shared = share::shared_dir(state, sid);
        std::fs::create_dir_all(&shared)
            .map_err(RuntimeError::io(format!("creating {}", shared.display())))?;
        // The socket gets a directory of its own: that directory is all of the state dir the
        // jailed VMM sees.
        let vsock_dir = dir.join("vsock");
        std::fs::create_dir_all(&vsock_dir)
            .map_err(RuntimeError::io(format!("creating {}", vsock_dir.display())))?;
        let vsock = vsock_dir.join("vsock.sock");
        let _ = std::fs::remove_file(&vsock);
        let confined = cfg.confinement.jail;
        if confined {
            let jail = dir.join("jail");
            let _ = std::fs::remove_dir(&jail);
            std::fs::create_dir(&jail).map_err(RuntimeError::io(format!("creating {}", jail.display())))?;
            // Mounts made under the share later (container root filesystems) must reach the
            // VMM's own mount namespace.
            share::make_propagating(&shared)?;
        }
        let log_path = dir.join("vmm.log");
        let log = std::fs::File::create(&log_path)
            .map_err(RuntimeError::io(format!("creating {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(RuntimeError::io("dup vmm log"))?;

        // A restored VM whose snapshot has no working set yet (or a damaged one) records it
        // (see `first_container_created`) through a control socket beside the vsock one, into
        // the same directory.
        let recording = restore.filter(|d| snapshot::needs_working_set(d)).map(|d| WorkingSetRecording {
            control: vsock_dir.join("control.sock"),
            snapshot: d.to_path_buf(),
        });
        if let Some(r) = &recording {
            let _ = std::fs::remove_file(&r.control);
        }
        let vsock_dir_path = vsock_dir.clone();
        // However long the state root makes the socket's path, husk-vmm binds it through its
        // directory, inherited as this fd.
        let (vsock_arg, vsock_dir) = uds::inherited_path(&vsock, VSOCK_DIR_FD)
            .map_err(RuntimeError::io(format!("vsock socket {}", vsock.display())))?;
        // (control socket, directory) as the VMM names them: through the inherited directory
        // fd when the state root makes the paths long.
        let control_args = recording.as_ref().map(|r| match vsock_dir {
            Some(_) => (
                uds::via_fd(VSOCK_DIR_FD, OsStr::new("control.sock")),
                PathBuf::from(format!("/proc/self/fd/{VSOCK_DIR_FD}")),
            ),
            None => (r.control.clone(), vsock_dir_path.clone()),
        });
        let config_path = dir.join("vm.json");
        let nics = if restore.is_some() { Nics::Snapshot } else { Nics::Own };
        let json = serde_json::to_vec_pretty(&vm_config(cfg, &dir, shape, &vsock_arg, nics))
            .map_err(|e| RuntimeError::Internal(format!("encoding the VM config: {e}")))?;
        std::fs::write(&config_path, json)
            .map_err(RuntimeError::io(format!("writing {}", config_path.display())))?;

        // husk-vmm runs in the pod's network namespace, where its taps are.
        let netns = match &shape.network {
            Some(w) => Some(
                std::fs::File::open(&w.netns)
                    .map_err(RuntimeError::io(format!("opening network namespace {}", w.netns.display())))?,
            ),
            None => None,
        };
        // Its own PID namespace and, from its first instruction, its sandbox's cgroup.
        let cgroup = if confined {
            Some(cgroup::create(sid, shape.memory_mib.into(), shape.vcpus).map_err(RuntimeError::io(
                format!(
                    "creating the VMM cgroup {} (VMMs are confined on cgroup v2 hosts; \
                     HUSK_VMM_JAIL=0 runs them unconfined, for debugging)",
                    cgroup::path(sid).display()
                ),
            ))?)
        } else {
            None
        };
        let private_chunks = cfg.snapshots.private_chunks.map(|n| std::ffi::OsString::from(n.to_string()));
        let mut args = vec![OsStr::new("--config"), config_path.as_os_str()];
        // The snapshot's directory name is its key, which the VMM checks against its own.
        let key = restore.and_then(|d| d.file_name());
        if let (Some(dir), Some(key)) = (restore, key) {
            args.extend([OsStr::new("--restore"), dir.as_os_str(), OsStr::new("--image-id"), key]);
            if let Some(n) = &private_chunks {
                args.extend([OsStr::new("--private-chunks"), n.as_os_str()]);
            }
            if let Some((control, out)) = &control_args {
                args.extend([OsStr::new("--control"), control.as_os_str()]);
                args.extend([OsStr::new("--snapshot-dir"), out.as_os_str()]);
            }
        }
        if crate::timeline::enabled() {
            args.push(OsStr::new("--timings"));
        }
        // The VMM sends a duplicate of its VM descriptor here (see `VmProcess::release_vm`).
        let (handover, vmm_handover) = std::os::unix::net::UnixStream::pair()
            .map_err(RuntimeError::io("making the VM handover socket".to_string()))?;
        args.extend([OsStr::new("--vm-handover"), OsStr::new("4")]);
        // A cold guest's agent announces itself here once it serves (a restored one is up at
        // once); bound before the VMM starts so the announcement cannot come first.
        let ready_path = ready_socket(&vsock);
        let _ = std::fs::remove_file(&ready_path);
        let ready = match restore {
            None => Some(
                uds::bind(&ready_path)
                    .map_err(RuntimeError::io(format!("binding {}", ready_path.display())))?,
            ),
            Some(_) => None,
        };
        crate::timeline::mark("vmm config written");
        let spawn_ns = crate::timeline::now_ns();
        let spawned = spawn(Spawn {
            program: &cfg.vmm,
            args,
            stdout: OwnedFd::from(log),
            stderr: OwnedFd::from(log2),
            netns: netns.map(OwnedFd::from),
            fd3: vsock_dir,
            fd4: Some(OwnedFd::from(vmm_handover)),
            cgroup,
            new_pid_ns: confined,
            die_with_parent: false,
        });
        let pid = match spawned {
            Ok(pid) => pid,
            Err(e) => {
                cgroup::remove(sid);
                return Err(RuntimeError::io(format!("starting {}", cfg.vmm.display()))(e).into());
            }
        };
        crate::timeline::mark("vmm spawned");
        crate::fault::point("vmm-booting");
        let mut process = VmProcess::new(pid).with_handover(OwnedFd::from(handover));
        let record = SandboxRecord {
            id: sid.to_string(),
            vmm_pid: pid,
            vmm_start: procinfo::start_time(pid).unwrap_or(0),
            vsock: vsock.clone(),
            containers: Vec::new(),
            memory_mib: shape.memory_mib,
            vcpus: shape.vcpus,
            network: shape.network.clone(),
            working_set: recording,
        };
        let waited = self.wait_for_agent(&mut process, &record, shape, &log_path, spawn_ns, ready).await;
        let _ = std::fs::remove_file(&ready_path);
        match waited {
            Ok(agent) => {
                keep_shared(&record, &agent);
                Ok(Booted { record, process, agent })
            }
            Err(e) => {
                process.kill();
                let exit = process.reap().await;
                cgroup::remove(sid);
                Err(LaunchError { error: e, exit })
            }
        }
    }
}

impl Vms for HuskVmm {
    type Agent = GrpcAgent;

    async fn boot(
        &self,
        state: &StateDir,
        sid: &str,
        shape: &VmShape,
    ) -> Result<Booted<GrpcAgent>, RuntimeError> {
        self.cfg.preflight()?;
        let snapshot = if self.cfg.snapshots.enabled && snapshot::eligible(shape) {
            match snapshot::ensure(&self.cfg, shape).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("no VM snapshot for this sandbox, booting cold: {e}");
                    None
                }
            }
        } else {
            None
        };
        crate::timeline::mark("snapshot looked up");
        if let Some(snap) = snapshot {
            match self.launch(state, sid, shape, Some(&snap)).await {
                Ok(b) => return Ok(b),
                // A confinement violation is the VMM's own fault, not the snapshot's.
                Err(LaunchError { error, exit: Some(VmExit::Signal(libc::SIGSYS)) }) => return Err(error),
                Err(LaunchError { error: e, .. }) => {
                    tracing::warn!("VM snapshot {} is unusable, booting cold: {e}", snap.display());
                    snapshot::discard(&snap);
                }
            }
        }
        self.launch(state, sid, shape, None).await.map_err(|e| e.error)
    }

    fn alive(&self, rec: &SandboxRecord) -> bool {
        procinfo::alive(rec.vmm_pid, rec.vmm_start)
    }

    async fn connect(&self, rec: &SandboxRecord, calls: Calls) -> Result<GrpcAgent, RuntimeError> {
        if !self.alive(rec) {
            return Err(RuntimeError::Vm(format!("the VM of sandbox {} is not running", rec.id)));
        }
        if let Some(a) = shared(rec) {
            return Ok(a.with_call_timeout(call_timeout(calls)));
        }
        let wait = match calls {
            Calls::Bounded => Duration::from_secs(10),
            Calls::Long => Duration::from_secs(30),
        };
        let agent = GrpcAgent::connect(&rec.vsock, wait, call_timeout(calls)).await?;
        keep_shared(rec, &agent);
        Ok(agent)
    }

    async fn first_container_created(&self, rec: &SandboxRecord) {
        let Some(recording) = &rec.working_set else { return };
        match snapshot::record_working_set(recording).await {
            Ok(a) if a.starts_with("ok") => {
                tracing::info!("sandbox {}: snapshot working set recorded: {a}", rec.id)
            }
            Ok(a) => tracing::warn!("sandbox {}: snapshot working set not recorded: {a}", rec.id),
            Err(e) => tracing::warn!("sandbox {}: snapshot working set not recorded: {e}", rec.id),
        }
        crate::timeline::mark("snapshot working set recorded");
    }

    async fn kill(&self, rec: &SandboxRecord) {
        forget_shared(rec);
        if !procinfo::signal(rec.vmm_pid, rec.vmm_start, nix::sys::signal::Signal::SIGKILL) {
            return;
        }
        tracing::info!("sandbox {}: its controller is gone; VM killed", rec.id);
        // SIGKILL is not delayed by the guest: the kernel frees the VM within moments. A zombie
        // (a parent that does not reap) already reads as gone.
        procinfo::wait_exit(rec.vmm_pid, rec.vmm_start, EXIT_WAIT).await;
    }

    async fn power_off(&self, rec: &SandboxRecord, process: VmProcess, how: PowerOff) {
        let was_alive = self.alive(rec);
        let kept = shared(rec);
        forget_shared(rec);
        if was_alive {
            // Whether nothing in the VM is left worth its own shutdown, so it is stopped at once.
            let stop_now = match how {
                PowerOff::Discard => {
                    tracing::debug!("sandbox {}: nothing runs in the guest; VM stopped at once", rec.id);
                    true
                }
                // The agent answers once every container is gone and the guest has synced what
                // they wrote to the shares: nothing in the VM is worth the guest's own shutdown
                // (about a fifth of a second of teardown).
                PowerOff::Destroy => self.destroy_in_guest(rec, kept).await,
            };
            if stop_now {
                procinfo::signal(rec.vmm_pid, rec.vmm_start, nix::sys::signal::Signal::SIGKILL);
            }
            procinfo::wait_exit(rec.vmm_pid, rec.vmm_start, EXIT_WAIT).await;
            if !stop_now && procinfo::signal(rec.vmm_pid, rec.vmm_start, nix::sys::signal::Signal::SIGKILL) {
                tracing::warn!("sandbox {}: husk-vmm did not exit after power-off; killed", rec.id);
            }
        }
        let mut process = process;
        let cgroup_path = cgroup::path(&rec.id);
        let cgroup_handed = process.release_vm(cgroup_path.exists().then_some(cgroup_path.as_path()));
        let exit = process.reap().await;
        crate::timeline::mark("vmm exited");
        // A VMM that died on its own (or one whose end we saw) is reported with its reason.
        if !was_alive || matches!(exit, Some(VmExit::Signal(libc::SIGSYS))) {
            let log = sandbox_dir_of(rec)
                .and_then(|d| std::fs::read_to_string(d.join("vmm.log")).ok())
                .unwrap_or_default();
            // Not our child (a later `delete`): its log still says what happened.
            let why = match exit {
                Some(e) => death_report(e, &log),
                None => log.lines().rev().find(|l| l.starts_with("husk-vmm:")).map(|l| l.trim().to_string()),
            };
            if let Some(why) = why {
                tracing::warn!("sandbox {}: the VM had stopped: {why}", rec.id);
            }
        }
        if !cgroup_handed {
            let id = rec.id.clone();
            let _ = tokio::task::spawn_blocking(move || cgroup::remove(&id)).await;
        }
        if let Some(w) = rec.network.clone() {
            let _ = tokio::task::spawn_blocking(move || crate::network::unwire(&w)).await;
        }
        crate::timeline::mark("vm teardown done (cgroup, taps)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_config_is_husk_vmms_schema_and_takes_any_path() {
        let cfg = Config::load().expect("config");
        let dir = Path::new("/run/a,b=c/sandboxes/x");
        let shape = VmShape {
            memory_mib: 256,
            vcpus: 2,
            hostname: "h".into(),
            extra_shares: vec![super::super::ExtraShare {
                tag: "rootfs".into(),
                path: "/img/with,comma".into(),
                read_only: true,
            }],
            network: Some(crate::network::Wired {
                netns: "/run/netns/p".into(),
                links: vec![crate::network::Link {
                    name: "eth0".into(),
                    index: 2,
                    tap: "husk-tap0".into(),
                    mac: [2, 0, 10, 213, 7, 5],
                    mtu: 1450,
                    addresses: vec![("10.213.7.5".parse().expect("ip"), 24)],
                }],
                routes: Vec::new(),
                loopback_forward: Some(15327),
            }),
        };
        let vsock = Path::new("/proc/self/fd/3/vsock.sock");
        let c = vm_config(&cfg, dir, &shape, vsock, Nics::Own);
        let text = serde_json::to_string(&c).expect("json");
        let back = VmConfig::from_json(&text).expect("husk-vmm parses it");
        assert_eq!(back, c);
        assert_eq!(back.fs.len(), 2);
        assert_eq!(back.fs[0].path, dir.join("shared"));
        assert!(back.fs[1].read_only);
        assert_eq!((back.memory_mib, back.vcpus), (256, 2));
        assert_eq!(back.net.len(), 1);
        let n = &back.net[0];
        assert_eq!(
            (n.tap.as_deref(), n.mac, n.mtu),
            (Some("husk-tap0"), Some(MacAddr([2, 0, 10, 213, 7, 5])), Some(1450))
        );
        let fwd = back.loopback_forward.expect("the pod's loopback is forwarded");
        assert_eq!((fwd.listen_port, fwd.guest_port), (15327, husk_proto::STDIO_PORT));

        // From a snapshot: the pod's taps, the devices as the template had them. The template's
        // devices are those with no tap, and its VM has no loopback of a pod to forward.
        let restored = vm_config(&cfg, dir, &shape, vsock, Nics::Snapshot);
        let template_shape = VmShape { network: None, ..shape.clone() };
        let template = vm_config(&cfg, dir, &template_shape, vsock, Nics::Template(1));
        let placeholder = Some(MacAddr(snapshot::placeholder_mac(0)));
        let r = &restored.net[0];
        assert_eq!((r.tap.as_deref(), r.mac, r.mtu), (Some("husk-tap0"), placeholder, None));
        let t = &template.net[..];
        assert_eq!(t, [NetConfig { tap: None, mac: placeholder, mtu: None }]);
        assert!(template.loopback_forward.is_none());
        assert!(restored.loopback_forward.is_some());
    }
}
