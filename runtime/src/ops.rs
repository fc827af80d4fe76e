//! Container lifecycle over the state directory and the sandbox VMs: what every entry point
//! (OCI CLI, `husk run`) does to create, start, signal, exec into and delete containers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_proto as pb;
use nix::sys::signal::Signal;

use crate::agent_client::AgentClient;
use crate::bundle::{self, Bundle};
use crate::config::Config;
use crate::error::RuntimeError;
use crate::launch::{self, RelayChild};
use crate::pod::{self, Role};
use crate::relay::{GuestStreams, Target};
use crate::sandbox::{self, ExtraShare, VmShape};
use crate::state::{ContainerRecord, Lock, SandboxRecord, StateDir};
use crate::{mounts, procinfo};

/// How long a delete waits for a container's relay to notice the process is gone.
const RELAY_EXIT_WAIT: Duration = Duration::from_secs(5);

/// What `state` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "created" => Status::Created,
            "running" => Status::Running,
            "paused" => Status::Paused,
            _ => Status::Stopped,
        }
    }
}

/// How the process's stdio reaches the host.
pub enum StdioMode {
    /// A detached relay with this process's fds 0-2 (or a pty sent over the console socket).
    Detached { console_socket: Option<PathBuf> },
    /// The caller relays in-process (foreground `run`/`exec`); `size` of its terminal, if any.
    Foreground { size: Option<(u16, u16)> },
}

/// Options of a create that do not come from the bundle.
pub struct CreateOpts {
    pub pid_file: Option<PathBuf>,
    pub stdio: StdioMode,
    /// Extra VM shares (only when this container starts the VM).
    pub extra_shares: Vec<ExtraShare>,
    /// Where the rootfs comes from, when not the bundle's (a share of its own).
    pub rootfs_share: Option<(String, String)>,
    pub memory_mib: Option<u32>,
    pub vcpus: Option<u32>,
}

/// A created container whose stdio the caller relays itself.
pub struct Foreground {
    pub target: Target,
    pub guest: GuestStreams,
    /// The VMM when this process started it, so the caller reaps it.
    pub vmm: Option<std::process::Child>,
}

pub struct Runtime {
    pub state: StateDir,
    pub cfg: Config,
}

/// Undo list for a create that fails halfway.
#[derive(Default)]
struct Partial {
    vm: Option<(SandboxRecord, Option<std::process::Child>)>,
    mounts: Vec<PathBuf>,
    share_dir: Option<PathBuf>,
    created_in: Option<AgentClient>,
}

impl Partial {
    async fn rollback(self, state: &StateDir, cid: &str) {
        if let Some(c) = &self.created_in {
            let req = pb::RemoveContainerRequest { container_id: cid.into(), force: true };
            let _ = c.containers.clone().remove_container(req).await;
        }
        mounts::unmount_all(&self.mounts);
        if let Some(d) = &self.share_dir {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some((rec, child)) = self.vm {
            if let Err(e) = sandbox::destroy(state, &rec, child).await {
                tracing::warn!("sandbox {}: {e}", rec.id);
            }
        }
    }
}

pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// VM size for a sandbox from its first container's limits: room for the memory limit plus
/// the guest's own needs, and as many vCPUs as the CPU quota allows.
fn vm_shape(cfg: &Config, b: &Bundle, opts: &CreateOpts) -> VmShape {
    let res = b.spec.linux().as_ref().and_then(|l| l.resources().clone());
    let mem_limit = res.as_ref().and_then(|r| r.memory().as_ref()).and_then(|m| m.limit()).filter(|l| *l > 0);
    let mut memory_mib = opts.memory_mib.unwrap_or(cfg.memory_mib);
    if let Some(l) = mem_limit {
        // A limit beyond the host's RAM (a spec's "unlimited" in bytes, say) must not make a VM
        // larger than the host.
        let want = (l as u64 >> 20) + 128;
        memory_mib = memory_mib.max(want.min(host_memory_mib()).min(u32::MAX as u64) as u32);
    }
    let cpu = res.as_ref().and_then(|r| r.cpu().clone());
    let quota_cpus = cpu.and_then(|c| match (c.quota(), c.period()) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some((q as u64).div_ceil(p).clamp(1, 254) as u32),
        _ => None,
    });
    let host_cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let vcpus = opts.vcpus.or(quota_cpus).unwrap_or(cfg.vcpus).clamp(1, host_cpus.max(1));
    let hostname = b.spec.hostname().clone().unwrap_or_else(|| "husk".into());
    VmShape { memory_mib, vcpus, hostname, extra_shares: opts.extra_shares.clone() }
}

/// The host's RAM in MiB (falls back to "no cap" if sysinfo fails).
fn host_memory_mib() -> u64 {
    // SAFETY: sysinfo fills the struct it is given.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    if unsafe { libc::sysinfo(&mut si) } != 0 {
        return u64::MAX;
    }
    (si.totalram as u64).saturating_mul(si.mem_unit as u64) >> 20
}

impl Runtime {
    pub fn new(root: &Path) -> Result<Self, RuntimeError> {
        Ok(Self { state: StateDir::new(root)?, cfg: Config::load()? })
    }

    /// `create`: the container exists in its VM, its process stopped before the user program.
    pub async fn create(
        &self,
        id: &str,
        bundle: &Bundle,
        opts: CreateOpts,
    ) -> Result<Option<Foreground>, RuntimeError> {
        if let StdioMode::Detached { console_socket: Some(s) } = &opts.stdio {
            launch::check_console_socket(s)?;
        }
        if bundle.terminal() && matches!(opts.stdio, StdioMode::Detached { console_socket: None }) {
            return Err(RuntimeError::InvalidArgument(
                "cannot allocate tty if runc will detach without setting console socket".into(),
            ));
        }
        let role = pod::role(&bundle.annotations(), id)?;
        let lock = self.state.reserve_container(id)?;
        let mut partial = Partial::default();
        match self.create_reserved(id, bundle, &role, opts, &mut partial).await {
            Ok(fg) => {
                drop(lock);
                Ok(fg)
            }
            Err(e) => {
                partial.rollback(&self.state, id).await;
                let _ = self.state.remove_container(id);
                drop(lock);
                Err(e)
            }
        }
    }

    async fn create_reserved(
        &self,
        id: &str,
        bundle: &Bundle,
        role: &Role,
        opts: CreateOpts,
        partial: &mut Partial,
    ) -> Result<Option<Foreground>, RuntimeError> {
        let sid = role.sandbox_id(id).to_string();
        let (slock, existing) = self.state.lock_sandbox(&sid)?;
        let (mut srec, client) = match (role.starts_vm(), existing) {
            (true, Some(old)) if sandbox::alive(&old) => {
                return Err(RuntimeError::WrongState(format!("sandbox {sid} already exists")))
            }
            (true, old) => {
                if old.is_some() {
                    // A VM that died without a delete: clear what it left.
                    let shared = sandbox::shared_dir(&self.state, &sid);
                    mounts::unmount_under(&shared)?;
                    let _ = std::fs::remove_dir_all(&shared);
                }
                let shape = vm_shape(&self.cfg, bundle, &opts);
                let started = match sandbox::start(&self.cfg, &self.state, &sid, &shape).await {
                    Ok(s) => s,
                    Err(e) => {
                        // The VM never came up: its directory goes too.
                        let _ = sandbox::remove_files(&self.state, &sid);
                        return Err(e);
                    }
                };
                self.state.write_sandbox(&started.record)?;
                partial.vm = Some((started.record.clone(), started.child));
                (started.record, started.client)
            }
            (false, Some(rec)) => {
                let client = sandbox::connect(&rec).await?;
                (rec, client)
            }
            (false, None) => {
                // lock_sandbox made the directory; a sandbox that never was leaves nothing.
                let _ = std::fs::remove_dir_all(self.state.sandbox_dir(&sid));
                return Err(RuntimeError::WrongState(format!("sandbox {sid} does not exist")));
            }
        };

        // Pod peers' host PIDs (what clients name in namespace paths) → guest PIDs.
        let peers: HashMap<i32, u32> = srec
            .containers
            .iter()
            .filter_map(|c| self.state.read_container(c).ok())
            .map(|c| (c.relay_pid, c.guest_pid))
            .collect();
        let shared = sandbox::shared_dir(&self.state, &sid);
        partial.share_dir = Some(shared.join(id));
        let guest = bundle::to_guest(bundle, id, &shared, &peers, opts.rootfs_share.is_none())?;
        partial.mounts = guest.host_mounts.clone();
        let rootfs = match &opts.rootfs_share {
            Some((tag, path)) => pb::Rootfs { share_tag: tag.clone(), path: path.clone() },
            None => pb::Rootfs { share_tag: sandbox::SHARE_TAG.into(), path: guest.rootfs_rel.clone() },
        };

        let target = Target { vsock: srec.vsock.clone(), container_id: id.into(), exec_id: String::new() };
        let (stdio, relay, guest_streams) =
            wire_stdio(&client, &target, bundle.terminal(), &opts.stdio).await?;

        let req = pb::CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: guest.spec_json,
            rootfs: Some(rootfs),
            stdio: Some(stdio),
        };
        let guest_pid = client.containers.clone().create_container(req).await?.into_inner().pid;
        partial.created_in = Some(client.clone());

        let (relay_pid, relay_start) = match &relay {
            Some(r) => (r.pid, r.start),
            None => {
                let me = std::process::id() as i32;
                (me, procinfo::start_time(me).unwrap_or(0))
            }
        };
        let rec = ContainerRecord {
            id: id.into(),
            sandbox_id: sid.clone(),
            bundle: bundle.dir.clone(),
            rootfs: bundle.rootfs.clone(),
            created: now_rfc3339(),
            annotations: bundle.annotations().into_iter().collect::<BTreeMap<_, _>>(),
            relay_pid,
            relay_start,
            guest_pid,
            host_mounts: guest.host_mounts,
        };
        self.state.write_container(&rec)?;
        srec.containers.push(id.into());
        self.state.write_sandbox(&srec)?;
        if let Some(p) = &opts.pid_file {
            crate::state::write_atomic(p, &relay_pid.to_string())?;
        }
        if let Some(r) = relay {
            r.go()?;
        }
        drop(slock);
        let vmm = partial.vm.take().and_then(|(_, child)| child);
        *partial = Partial::default();
        Ok(guest_streams.map(|guest| Foreground { target, guest, vmm }))
    }

    /// The container's status as its VM sees it; stopped when the VM is gone.
    pub async fn status(&self, rec: &ContainerRecord) -> (Status, Option<AgentClient>) {
        let Ok(Some(srec)) = self.state.read_sandbox(&rec.sandbox_id) else { return (Status::Stopped, None) };
        if !sandbox::alive(&srec) {
            return (Status::Stopped, None);
        }
        let client = match sandbox::connect(&srec).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("container {}: {e}", rec.id);
                return (Status::Stopped, None);
            }
        };
        let status = match client.containers.clone().list_containers(pb::Empty {}).await {
            Ok(l) => l
                .into_inner()
                .containers
                .iter()
                .find(|c| c.container_id == rec.id)
                .map(|c| Status::parse(&c.status))
                .unwrap_or(Status::Stopped),
            Err(e) => {
                tracing::warn!("container {}: {}", rec.id, e.message());
                Status::Stopped
            }
        };
        (status, Some(client))
    }

    /// Locks `id` and connects to its VM, requiring one of `allowed` states.
    async fn locked_live(
        &self,
        id: &str,
        what: &str,
        allowed: &[Status],
    ) -> Result<(Lock, ContainerRecord, AgentClient, Status), RuntimeError> {
        let (lock, rec) = self.state.lock_container(id)?;
        let (status, client) = self.status(&rec).await;
        match client {
            Some(c) if allowed.contains(&status) => Ok((lock, rec, c, status)),
            _ => Err(RuntimeError::WrongState(match status {
                Status::Stopped => format!("cannot {what} container {id}: container not running"),
                s => format!("cannot {what} container {id}: it is {}", s.as_str()),
            })),
        }
    }

    pub async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let (_lock, rec) = self.state.lock_container(id)?;
        let (status, client) = self.status(&rec).await;
        match (status, client) {
            (Status::Created, Some(c)) => {
                c.containers.clone().start_container(pb::ContainerRef { container_id: id.into() }).await?;
                Ok(())
            }
            (Status::Stopped, _) => {
                Err(RuntimeError::WrongState("cannot start a container that has stopped".into()))
            }
            (s, _) => {
                Err(RuntimeError::WrongState(format!("cannot start an already {} container", s.as_str())))
            }
        }
    }

    pub async fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        let alive = [Status::Created, Status::Running, Status::Paused];
        // runc's words for a stopped container, which containerd's shim matches on.
        let (_lock, _rec, c, _) = self.locked_live(id, "kill", &alive).await.map_err(|e| match e {
            RuntimeError::WrongState(_) => RuntimeError::WrongState("container not running".into()),
            e => e,
        })?;
        let req = pb::SignalProcessRequest { container_id: id.into(), exec_id: String::new(), signal, all };
        c.processes.clone().signal_process(req).await.map_err(|e| {
            if e.code() == tonic::Code::FailedPrecondition {
                RuntimeError::WrongState("container not running".into())
            } else {
                e.into()
            }
        })?;
        Ok(())
    }

    pub async fn pause(&self, id: &str, pause: bool) -> Result<(), RuntimeError> {
        let (what, need) = if pause { ("pause", Status::Running) } else { ("resume", Status::Paused) };
        let (_lock, _rec, c, _) = self.locked_live(id, what, &[need]).await?;
        let r = pb::ContainerRef { container_id: id.into() };
        if pause {
            c.containers.clone().pause_container(r).await?;
        } else {
            c.containers.clone().resume_container(r).await?;
        }
        Ok(())
    }

    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<(), RuntimeError> {
        let live = [Status::Created, Status::Running, Status::Paused];
        let (_lock, _rec, c, _) = self.locked_live(id, "update", &live).await?;
        c.containers
            .clone()
            .update_container(pb::UpdateContainerRequest { container_id: id.into(), resources_json })
            .await?;
        Ok(())
    }

    pub async fn processes(&self, id: &str) -> Result<Vec<pb::ProcessInfo>, RuntimeError> {
        let live = [Status::Created, Status::Running, Status::Paused];
        let (_lock, _rec, c, _) = self.locked_live(id, "list processes of", &live).await?;
        Ok(c.containers
            .clone()
            .list_processes(pb::ContainerRef { container_id: id.into() })
            .await?
            .into_inner()
            .processes)
    }

    pub async fn stats(&self, id: &str) -> Result<pb::ContainerStatsResponse, RuntimeError> {
        let live = [Status::Created, Status::Running, Status::Paused];
        let (_lock, _rec, c, _) = self.locked_live(id, "get stats of", &live).await?;
        let r = pb::ContainerRef { container_id: id.into() };
        Ok(c.containers.clone().container_stats(r).await?.into_inner())
    }

    /// `exec`: another process in a running container.
    pub async fn exec(
        &self,
        id: &str,
        process_json: Vec<u8>,
        terminal: bool,
        pid_file: Option<&Path>,
        stdio: StdioMode,
    ) -> Result<Option<Foreground>, RuntimeError> {
        if let StdioMode::Detached { console_socket: Some(s) } = &stdio {
            launch::check_console_socket(s)?;
        }
        if terminal && matches!(stdio, StdioMode::Detached { console_socket: None }) {
            return Err(RuntimeError::InvalidArgument(
                "cannot allocate tty if runc will detach without setting console socket".into(),
            ));
        }
        let (lock, rec) = self.state.lock_container(id)?;
        let (status, client) = self.status(&rec).await;
        let client = match (status, client) {
            (Status::Running, Some(c)) => c,
            (s, _) => {
                return Err(RuntimeError::WrongState(format!("cannot exec in a {} container", s.as_str())))
            }
        };
        let srec =
            self.state.read_sandbox(&rec.sandbox_id)?.ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        let exec_id = new_exec_id();
        let target = Target { vsock: srec.vsock.clone(), container_id: id.into(), exec_id: exec_id.clone() };
        let (pstdio, relay, fg) = wire_stdio(&client, &target, terminal, &stdio).await?;
        let req = pb::ExecProcessRequest {
            container_id: id.into(),
            exec_id,
            oci_process_json: process_json,
            stdio: Some(pstdio),
        };
        client.processes.clone().exec_process(req).await?;
        let pid = relay.as_ref().map(|r| r.pid).unwrap_or(std::process::id() as i32);
        if let Some(p) = pid_file {
            crate::state::write_atomic(p, &pid.to_string())?;
        }
        if let Some(r) = relay {
            r.go()?;
        }
        drop(lock);
        Ok(fg.map(|guest| Foreground { target, guest, vmm: None }))
    }

    /// `delete`: removes the container from its VM and the host; the VM goes with its last
    /// container. A stopped container (VM gone included) needs no `force`.
    pub async fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let (lock, rec) = match self.state.lock_container(id) {
            // As runc: forcing the delete of a container that is gone succeeds, so a caller
            // retrying a delete (containerd does) is done.
            Err(RuntimeError::NotFound(_)) if force => return Ok(()),
            r => r?,
        };
        let (status, client) = self.status(&rec).await;
        if matches!(status, Status::Running | Status::Paused) && !force {
            return Err(RuntimeError::WrongState(format!(
                "cannot delete container {id} that is not stopped: {}",
                status.as_str()
            )));
        }
        if let Some(c) = &client {
            let req = pb::RemoveContainerRequest { container_id: id.into(), force: true };
            if let Err(e) = c.containers.clone().remove_container(req).await {
                if e.code() != tonic::Code::NotFound {
                    return Err(e.into());
                }
            }
        }
        // The relay ends once its process is gone; one whose VM vanished may need a push.
        let deadline = Instant::now() + RELAY_EXIT_WAIT;
        while procinfo::alive(rec.relay_pid, rec.relay_start)
            && rec.relay_pid != std::process::id() as i32
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if rec.relay_pid != std::process::id() as i32 {
            procinfo::signal(rec.relay_pid, rec.relay_start, Signal::SIGKILL);
        }
        mounts::unmount_all(&rec.host_mounts);
        let shared = sandbox::shared_dir(&self.state, &rec.sandbox_id);
        let mine = shared.join(id);
        mounts::unmount_under(&mine)?;
        let _ = std::fs::remove_dir_all(&mine);
        self.leave_sandbox(&rec.sandbox_id, id, None).await?;
        self.state.remove_container(id)?;
        drop(lock);
        Ok(())
    }

    /// Takes `cid` out of its sandbox's record; the last one out destroys the VM.
    pub async fn leave_sandbox(
        &self,
        sid: &str,
        cid: &str,
        child: Option<std::process::Child>,
    ) -> Result<(), RuntimeError> {
        let (_slock, srec) = self.state.lock_sandbox(sid)?;
        let Some(mut srec) = srec else {
            return sandbox::remove_files(&self.state, sid);
        };
        srec.containers.retain(|c| c != cid);
        if srec.containers.is_empty() {
            mounts::unmount_under(&sandbox::shared_dir(&self.state, sid))?;
            sandbox::destroy(&self.state, &srec, child).await
        } else {
            self.state.write_sandbox(&srec)
        }
    }
}

/// Opens a new process's guest streams and connects them: to a detached relay (with a pty sent
/// over the console socket for a terminal), or back to the caller for a foreground relay.
async fn wire_stdio(
    client: &AgentClient,
    target: &Target,
    terminal: bool,
    mode: &StdioMode,
) -> Result<(pb::Stdio, Option<RelayChild>, Option<GuestStreams>), RuntimeError> {
    let size = match mode {
        StdioMode::Foreground { size } => *size,
        StdioMode::Detached { .. } => None,
    };
    let (stdio, streams) = launch::open_streams(client, terminal, size).await?;
    match mode {
        StdioMode::Detached { console_socket } => {
            let pty = console_socket.as_deref().filter(|_| terminal).map(launch::console_pty).transpose()?;
            Ok((stdio, Some(launch::spawn_relay(target.clone(), streams, pty)?), None))
        }
        StdioMode::Foreground { .. } => Ok((stdio, None, Some(streams))),
    }
}

/// A fresh exec id (agent rules: 1-64 of [A-Za-z0-9_.-]).
fn new_exec_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("exec-{}-{hex}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_look_like_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), "2026-12-01T07:58:30.123456789Z".len(), "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }

    #[test]
    fn vm_memory_follows_the_limit_but_not_past_the_host() {
        let cfg = Config::load().expect("config");
        let d = std::env::temp_dir().join(format!("husk-ops-shape-{}", std::process::id()));
        std::fs::create_dir_all(d.join("rootfs")).expect("mkdir");
        let shape = |limit: i64| {
            let spec = serde_json::json!({
                "ociVersion": "1.0.2",
                "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
                "root": {"path": "rootfs"},
                "linux": {"resources": {"memory": {"limit": limit}}}
            });
            let b =
                Bundle::from_spec(d.clone(), serde_json::from_value(spec).expect("spec")).expect("bundle");
            let opts = CreateOpts {
                pid_file: None,
                stdio: StdioMode::Foreground { size: None },
                extra_shares: vec![],
                rootfs_share: None,
                memory_mib: None,
                vcpus: None,
            };
            vm_shape(&cfg, &b, &opts).memory_mib
        };
        assert_eq!(shape(1 << 30), (1024 + 128).max(cfg.memory_mib));
        assert!(u64::from(shape(i64::MAX)) <= host_memory_mib().max(cfg.memory_mib.into()));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn exec_ids_are_valid_and_distinct() {
        let (a, b) = (new_exec_id(), new_exec_id());
        assert_ne!(a, b);
        assert!(crate::state::check_id(&a).is_ok(), "{a}");
    }
}
