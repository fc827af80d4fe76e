//! The agent's state and every operation the API offers, independent of gRPC.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_proto::{event, ContainerStatus, Event, ExitEvent, Stdio};
use oci_spec::runtime::{LinuxSeccomp, Process};
use tokio::sync::{broadcast, Notify};
use tokio::task::AbortHandle;

use crate::cgroup::ContainerCgroup;
use crate::error::AgentError;
use crate::oci::{self, Op};
use crate::oom::OomWatcher;
use crate::reaper::{self, ExitStatus, ExitWatch, Reaper};
use crate::stdio::StdioRegistry;
use crate::{init, lifeline, pipes, procfs, rootfs, spec, tty, validate};

/// How long a forced removal waits for the container's init to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long the agent waits for a container to send its pty.
const CONSOLE_WAIT: Duration = Duration::from_secs(30);

pub struct Config {
    /// The agent's own files: bundles, libcontainer state, console sockets, overlays.
    pub state_dir: PathBuf,
    /// Where share `<tag>` is found (`<shares_dir>/<tag>`).
    pub shares_dir: PathBuf,
    /// In a VM: shares are mounted, hostname and clock are set, destroy powers off.
    pub guest: bool,
    /// Use MS_MOVE + chroot instead of pivot_root (a root on rootfs refuses pivot_root).
    pub no_pivot: bool,
}

/// One process the agent started: a container's init or an exec.
struct Proc {
    pid: i32,
    exit: ExitWatch,
    /// The pty master, kept for resizes.
    tty: Option<OwnedFd>,
    /// The copy into the process's stdin pipe; aborting it closes the pipe (CloseStdin).
    stdin: Mutex<Option<AbortHandle>>,
}

impl Proc {
    fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }
}

struct Container {
    id: String,
    bundle: PathBuf,
    cgroup: ContainerCgroup,
    overlay: Option<PathBuf>,
    started: AtomicBool,
    /// The container's own process, whose confinement every exec inherits where the exec's
    /// process leaves it unset, and its seccomp profile, which every exec gets.
    process: Process,
    seccomp: Option<LinuxSeccomp>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

impl Container {
    fn status(&self) -> ContainerStatus {
        if self.init.exited().is_some() {
            ContainerStatus::Stopped
        } else if self.cgroup.is_frozen() {
            ContainerStatus::Paused
        } else if self.started.load(Ordering::SeqCst) {
            ContainerStatus::Running
        } else {
            ContainerStatus::Created
        }
    }

    fn process(&self, exec_id: &str) -> Result<Arc<Proc>, AgentError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("container {} has no exec {exec_id:?}", self.id)))
    }

    fn require_running(&self, what: &str) -> Result<(), AgentError> {
        match self.status() {
            ContainerStatus::Running => Ok(()),
            s => Err(AgentError::FailedPrecondition(format!(
                "cannot {what}: container {} is {}",
                self.id,
                status_word(s)
            ))),
        }
    }
}

/// The status as error messages say it ("running").
fn status_word(s: ContainerStatus) -> &'static str {
    match s {
        ContainerStatus::Unspecified => "in an unknown state",
        ContainerStatus::Created => "created",
        ContainerStatus::Running => "running",
        ContainerStatus::Paused => "paused",
        ContainerStatus::Stopped => "stopped",
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Agent {
    cfg: Config,
    reaper: Arc<Reaper>,
    /// Starts the container helpers (keeping one spare).
    helpers: Arc<crate::spare::Helpers>,
    pub stdio: Arc<StdioRegistry>,
    oom: Arc<OomWatcher>,
    pub events: broadcast::Sender<Event>,
    /// `None` while a container is being created or removed: the id is taken.
    containers: Mutex<HashMap<String, Option<Arc<Container>>>>,
    /// Shares in place, by tag: whether each is mounted read-only.
    shares: Mutex<HashMap<String, bool>>,
    pub init_started_ns: AtomicU64,
    pub ready_ns: AtomicU64,
    /// Names console sockets: short whatever the ids, so they always fit a `sun_path`.
    console_seq: AtomicU64,
    /// Notified by DestroySandbox once every container is gone.
    pub shutdown: Notify,
}

/// Frees a reserved container id unless the creation it guards succeeded.
struct Reservation<'a> {
    agent: &'a Agent,
    id: String,
    done: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            lock(&self.agent.containers).remove(&self.id);
        }
    }
}

impl Agent {
    pub fn new(cfg: Config, reaper: Arc<Reaper>) -> Result<Self, AgentError> {
        for sub in ["bundles", "containers", "console", "overlays", "execs"] {
            let d = cfg.state_dir.join(sub);
            std::fs::create_dir_all(&d).map_err(AgentError::io(format!("mkdir {}", d.display())))?;
        }
        let (events, _) = broadcast::channel(1024);
        let oom = Arc::new(OomWatcher::new(events.clone())?);
        Ok(Self {
            cfg,
            helpers: crate::spare::Helpers::new(reaper.clone()),
            reaper,
            stdio: Arc::default(),
            oom,
            events,
            containers: Mutex::default(),
            shares: Mutex::default(),
            init_started_ns: AtomicU64::new(0),
            ready_ns: AtomicU64::new(0),
            console_seq: AtomicU64::new(0),
            shutdown: Notify::new(),
        })
    }

    pub fn oom(&self) -> Arc<OomWatcher> {
        self.oom.clone()
    }

    fn lc_root(&self) -> PathBuf {
        self.cfg.state_dir.join("containers")
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, AgentError> {
        validate::name("container id", id)?;
        match lock(&self.containers).get(id) {
            Some(Some(c)) => Ok(c.clone()),
            Some(None) => {
                Err(AgentError::FailedPrecondition(format!("container {id} is being created or removed")))
            }
            None => Err(AgentError::NotFound(format!("no container {id}"))),
        }
    }

    // ---- sandbox ----------------------------------------------------------------------------

    pub async fn create_sandbox(&self, req: husk_proto::CreateSandboxRequest) -> Result<(), AgentError> {
        if !req.hostname.is_empty() {
            check_hostname(&req.hostname)?;
        }
        for s in &req.shares {
            validate::name("share tag", &s.tag)?;
        }
        let (ifaces, routes) = crate::network::check(&req.interfaces, &req.routes)?;
        crate::entropy::check(&req.entropy)?;
        if !self.cfg.guest && !ifaces.is_empty() {
            return Err(AgentError::FailedPrecondition(
                "host mode does not configure the host's network".into(),
            ));
        }
        let mut reseed = None;
        if self.cfg.guest {
            // First, so that nothing after it (nor any container) draws from an RNG state
            // shared with every sandbox restored from the same snapshot. The virtio-rng part
            // is read while the shares are mounted, and mixed in before the network and any
            // container.
            reseed = Some(crate::entropy::reseed(&req.entropy)?);
            if !req.hostname.is_empty() {
                nix::unistd::sethostname(&req.hostname).map_err(AgentError::errno("sethostname"))?;
            }
            if req.unix_time_ns != 0 {
                init::set_clock(req.unix_time_ns)?;
            }
        }
        for s in &req.shares {
            let target = self.cfg.shares_dir.join(&s.tag);
            if lock(&self.shares).contains_key(&s.tag) {
                continue;
            }
            if self.cfg.guest {
                init::mount_share(&s.tag, &target, s.read_only)?;
            } else if !target.is_dir() {
                return Err(AgentError::NotFound(format!(
                    "share {:?} is not a directory under {}",
                    s.tag,
                    self.cfg.shares_dir.display()
                )));
            }
            lock(&self.shares).insert(s.tag.clone(), s.read_only);
        }
        if let Some(r) = reseed {
            r.finish().await?;
        }
        if self.cfg.guest {
            crate::network::configure(&ifaces, &routes).await?;
        }
        Ok(())
    }

    /// Before the VM is snapshotted: the agent's binary (its code, and the helpers') into 2 MiB
    /// pages, so VMs restored from the snapshot fault it in a chunk at a time. Best effort: a
    /// kernel that joins nothing leaves a snapshot as good as before. A host-mode agent has no
    /// snapshot to prepare.
    pub async fn prepare_snapshot(&self) -> Result<husk_proto::PrepareSnapshotResponse, AgentError> {
        if !self.cfg.guest {
            return Err(AgentError::FailedPrecondition("host mode has no VM to snapshot".into()));
        }
        let joined = tokio::task::spawn_blocking(crate::page_cache::join_own_binary)
            .await
            .map_err(|e| AgentError::Internal(format!("page cache task: {e}")))?
            .map_err(AgentError::io("joining the agent binary's page cache"))?;
        tracing::debug!("binary page cache: {} 2 MiB chunks joined, {} not", joined.chunks, joined.failed);
        Ok(husk_proto::PrepareSnapshotResponse { joined_chunks: joined.chunks, failed_chunks: joined.failed })
    }

    pub fn set_time(&self, unix_ns: i64) -> Result<(), AgentError> {
        if !self.cfg.guest {
            return Err(AgentError::FailedPrecondition("host mode does not set the host's clock".into()));
        }
        init::set_clock(unix_ns)
    }

    /// Removes every container; the caller then stops serving and powers off (or exits).
    pub async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        if self.cfg.guest {
            // The VM ends with this answer: its containers are killed, not taken apart one by
            // one (a libcontainer helper each, whose work dies with the VM anyway).
            let live: Vec<Arc<Container>> = lock(&self.containers).values().flatten().cloned().collect();
            for c in live {
                if let Err(e) = c.cgroup.signal_all(nix::sys::signal::Signal::SIGKILL) {
                    tracing::warn!("destroy: killing container {}: {e}", c.id);
                }
            }
        } else {
            let ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
            for id in ids {
                if let Err(e) = self.remove_container(&id, true).await {
                    tracing::warn!("destroy: removing {id}: {e}");
                }
            }
        }
        // Whatever containers wrote to the shares is on the host before the answer: the host
        // may stop the VM as soon as it has it.
        if self.cfg.guest {
            let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
        }
        self.shutdown.notify_one();
        Ok(())
    }

    pub fn guest_details(&self) -> husk_proto::GuestDetailsResponse {
        let uname = nix::sys::utsname::uname().ok();
        husk_proto::GuestDetailsResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kernel_release: uname.map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
            cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            memory_bytes: procfs::mem_total_bytes().unwrap_or(0),
            init_started_ns: self.init_started_ns.load(Ordering::Relaxed),
            agent_ready_ns: self.ready_ns.load(Ordering::Relaxed),
            agent_rss_bytes: procfs::self_rss_bytes().unwrap_or(0),
        }
    }

    // ---- containers -------------------------------------------------------------------------

    fn reserve(&self, id: &str) -> Result<Reservation<'_>, AgentError> {
        validate::name("container id", id)?;
        let mut containers = lock(&self.containers);
        if containers.contains_key(id) {
            return Err(AgentError::AlreadyExists(format!("container {id} already exists")));
        }
        containers.insert(id.to_string(), None);
        Ok(Reservation { agent: self, id: id.to_string(), done: false })
    }

    fn resolve_rootfs(&self, r: &husk_proto::Rootfs) -> Result<PathBuf, AgentError> {
        validate::name("share tag", &r.share_tag)?;
        validate::relative_path("rootfs path", &r.path)?;
        if !lock(&self.shares).contains_key(&r.share_tag) {
            return Err(AgentError::NotFound(format!(
                "share {:?} is not mounted (CreateSandbox first)",
                r.share_tag
            )));
        }
        rootfs::resolve(&self.cfg.shares_dir.join(&r.share_tag), &r.path)
    }

    fn share_roots(&self) -> Vec<PathBuf> {
        lock(&self.shares).keys().filter_map(|t| self.cfg.shares_dir.join(t).canonicalize().ok()).collect()
    }

    /// Creates container `req.container_id`, and starts it too when `req.start` says so.
    /// Returns its init's PID.
    pub async fn create_container(&self, req: husk_proto::CreateContainerRequest) -> Result<u32, AgentError> {
        let mut reservation = self.reserve(&req.container_id)?;
        let id = req.container_id.clone();
        let rootfs_req =
            req.rootfs.ok_or_else(|| AgentError::InvalidArgument("rootfs is required".into()))?;
        let stdio = req.stdio.unwrap_or_default();
        let lower = self.resolve_rootfs(&rootfs_req)?;
        let mut spec = spec::prepare(&req.oci_spec_json, &id, &lower, stdio.terminal, &self.share_roots())?;

        let read_only_root = spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false);
        let overlay_dir = self.cfg.state_dir.join("overlays").join(&id);
        // In a VM the share's mount flag says it (a share is one mount there) without asking the
        // host's filesystem over virtio-fs; on a host, the directory's own filesystem does.
        let lower_read_only = match lock(&self.shares).get(&rootfs_req.share_tag) {
            Some(&ro) if self.cfg.guest => ro,
            _ => rootfs::is_read_only(&lower),
        };
        let overlay = if rootfs::needs_overlay(read_only_root, lower_read_only) {
            let merged = rootfs::mount_overlay(&lower, &overlay_dir)?;
            if let Some(root) = spec.root().clone().as_mut() {
                root.set_path(merged);
                spec.set_root(Some(root.clone()));
            }
            Some(overlay_dir.clone())
        } else {
            None
        };
        let bundle = self.cfg.state_dir.join("bundles").join(&id);
        let result = self.create_in_bundle(&id, &bundle, &spec, &stdio, req.start).await;
        let (init, cgroup, lifeline) = match result {
            Ok(v) => v,
            Err(e) => {
                self.clear_leftovers(&id).await;
                let _ = std::fs::remove_dir_all(&bundle);
                if overlay.is_some() {
                    rootfs::remove_overlay(&overlay_dir);
                }
                return Err(e);
            }
        };
        if let Err(e) = self.oom.watch(&id, cgroup.memory_events()) {
            tracing::warn!("container {id}: no OOM events: {e}");
        }
        let pid = init.pid;
        self.spawn_exit_event(&id, "", &init);
        let container = Arc::new(Container {
            id: id.clone(),
            bundle,
            cgroup,
            overlay,
            started: AtomicBool::new(req.start),
            process: spec.process().clone().unwrap_or_default(),
            seccomp: spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
            init,
            execs: Mutex::default(),
        });
        if let Some(fd) = lifeline {
            // The init's holder gone: the whole container goes, as if its init had died.
            let c = container.clone();
            let watched = lifeline::watch(fd, container.init.exit.clone(), move || {
                let _ = c.cgroup.freeze(false);
                if let Err(e) = c.cgroup.signal_all(nix::sys::signal::Signal::SIGKILL) {
                    tracing::warn!("container {}: {e}", c.id);
                }
            });
            // The container exists by now: keep it, as a process whose holder is gone would be.
            if let Err(e) = watched {
                tracing::warn!("container {id}: no lifeline: {e}");
            }
        }
        lock(&self.containers).insert(id, Some(container));
        reservation.done = true;
        Ok(pid as u32)
    }

    async fn create_in_bundle(
        &self,
        id: &str,
        bundle: &Path,
        spec: &oci_spec::runtime::Spec,
        stdio: &Stdio,
        start_now: bool,
    ) -> Result<(Arc<Proc>, ContainerCgroup, Option<OwnedFd>), AgentError> {
        std::fs::create_dir_all(bundle).map_err(AgentError::io("creating the bundle"))?;
        let mut spec = spec.clone();
        let start = crate::confine::take_seccomp(&mut spec);
        let json =
            serde_json::to_vec(&spec).map_err(|e| AgentError::Internal(format!("encoding spec: {e}")))?;
        std::fs::write(bundle.join("config.json"), json).map_err(AgentError::io("writing config.json"))?;
        let console = self.console_path();
        let op = Op::Create {
            root: self.lc_root(),
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            console_socket: stdio.terminal.then(|| console.clone()),
            no_pivot: self.cfg.no_pivot,
            start: Box::new(start),
            propagation: crate::propagation::wanted(&spec),
            start_now,
        };
        let (proc, lifeline) = self.run_process(op, stdio, &console).await?;
        let cgroup = ContainerCgroup::new(id)?;
        Ok((proc, cgroup, lifeline))
    }

    /// A fresh console socket path: the agent's own short name, never one built from ids.
    fn console_path(&self) -> PathBuf {
        let n = self.console_seq.fetch_add(1, Ordering::Relaxed);
        self.cfg.state_dir.join("console").join(format!("{n}.sock"))
    }

    /// Runs a create or exec helper with the request's stdio, and sets up the pty relay.
    /// Returns the process and its lifeline stream, for the caller to watch.
    async fn run_process(
        &self,
        op: Op,
        stdio: &Stdio,
        console: &Path,
    ) -> Result<(Arc<Proc>, Option<OwnedFd>), AgentError> {
        let mut streams = StdioFds::claim(&self.stdio, stdio)?;
        let console_rx = if stdio.terminal {
            let sock = tty::ConsoleSocket::bind(console)?;
            Some(tokio::task::spawn_blocking(move || sock.receive(CONSOLE_WAIT)))
        } else {
            None
        };
        let (helper_stdio, stdin_copy) = streams.process_stdio()?;
        let pid = self.helpers.run(op, helper_stdio).await;
        let _ = std::fs::remove_file(console);
        let pid = match pid {
            Ok(Some(pid)) => pid,
            Ok(None) => return Err(AgentError::Internal("container helper reported no pid".into())),
            Err(e) => {
                if let Some(rx) = console_rx {
                    rx.abort();
                }
                return Err(e);
            }
        };
        let exit = self.reaper.watch(pid);
        let tty = match console_rx {
            Some(rx) => {
                let master =
                    rx.await.map_err(|e| AgentError::Internal(format!("console receiver: {e}")))??;
                if stdio.rows > 0 && stdio.cols > 0 {
                    tty::resize(&master, stdio.rows, stdio.cols)?;
                }
                let relay = master.try_clone().map_err(AgentError::io("dup pty master"))?;
                tty::spawn_relay(relay, streams.stdin.take(), streams.stdout.take())?;
                Some(master)
            }
            None => None,
        };
        Ok((Arc::new(Proc { pid, exit, tty, stdin: Mutex::new(stdin_copy) }), streams.lifeline))
    }

    fn spawn_exit_event(&self, container_id: &str, exec_id: &str, p: &Arc<Proc>) {
        let (events, rx, pid) = (self.events.clone(), p.exit.clone(), p.pid);
        let (container_id, exec_id) = (container_id.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            if let Some(status) = reaper::wait(rx).await {
                let exit = ExitEvent { container_id, exec_id, pid: pid as u32, status: Some(status.into()) };
                let _ = events.send(Event { kind: Some(event::Kind::Exit(exit)) });
            }
        });
    }

    /// What a create helper that died mid-way (killed, or the VM short of memory) may have left
    /// of container `id`: libcontainer's state, an init waiting for Start, its cgroup. All of
    /// it goes, so the id can be created again; libcontainer cleans up after its own errors, so
    /// usually there is nothing.
    async fn clear_leftovers(&self, id: &str) {
        let state = self.lc_root().join(id);
        if !state.exists() {
            return;
        }
        tracing::warn!("container {id}: clearing what a failed create left");
        if let Ok(cg) = ContainerCgroup::new(id) {
            let _ = cg.freeze(false);
            let _ = cg.signal_all(nix::sys::signal::Signal::SIGKILL);
        }
        let delete = async {
            let null = StdioFds::null_triple()?;
            let op = Op::Delete { root: self.lc_root(), id: id.to_string(), force: true };
            self.helpers.run(op, null).await
        };
        if let Err(e) = delete.await {
            tracing::warn!("container {id}: libcontainer delete: {e}");
        }
        let _ = std::fs::remove_dir_all(&state);
        if let Ok(cg) = ContainerCgroup::new(id) {
            cg.remove();
        }
    }

    pub async fn start_container(&self, id: &str) -> Result<(), AgentError> {
        let c = self.container(id)?;
        let status = c.status();
        if status != ContainerStatus::Created {
            return Err(AgentError::FailedPrecondition(format!(
                "cannot start container {id}: it is {}",
                status_word(status)
            )));
        }
        let (root, owned_id) = (self.lc_root(), id.to_string());
        tokio::task::spawn_blocking(move || oci::start(&root, &owned_id))
            .await
            .map_err(|e| AgentError::Internal(format!("start task: {e}")))??;
        c.started.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub async fn remove_container(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let c = self.container(id)?;
        let running = c.init.exited().is_none() && c.started.load(Ordering::SeqCst);
        if running && !force {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} is running; stop it first or force"
            )));
        }
        // Take the id out of service while tearing down.
        lock(&self.containers).insert(id.to_string(), None);
        if c.init.exited().is_none() {
            let _ = c.cgroup.freeze(false);
            c.cgroup.signal_all(nix::sys::signal::Signal::SIGKILL)?;
            if tokio::time::timeout(KILL_WAIT, reaper::wait(c.init.exit.clone())).await.is_err() {
                lock(&self.containers).insert(id.to_string(), Some(c.clone()));
                return Err(AgentError::Internal(format!(
                    "container {id} did not die within {KILL_WAIT:?} of SIGKILL"
                )));
            }
        }
        self.oom.unwatch(id);
        let null = StdioFds::null_triple()?;
        if let Err(e) =
            self.helpers.run(Op::Delete { root: self.lc_root(), id: id.to_string(), force: true }, null).await
        {
            tracing::warn!("container {id}: libcontainer delete: {e}");
            // Its processes are dead already; its state must not block the id's next create.
            let _ = std::fs::remove_dir_all(self.lc_root().join(id));
        }
        c.cgroup.remove();
        let _ = std::fs::remove_dir_all(&c.bundle);
        let _ = std::fs::remove_dir_all(self.cfg.state_dir.join("execs").join(id));
        if let Some(dir) = &c.overlay {
            rootfs::remove_overlay(dir);
        }
        lock(&self.containers).remove(id);
        Ok(())
    }

    pub fn pause(&self, id: &str, paused: bool) -> Result<(), AgentError> {
        let c = self.container(id)?;
        match (paused, c.status()) {
            (true, ContainerStatus::Running) | (false, ContainerStatus::Paused) => c.cgroup.freeze(paused),
            (_, s) => Err(AgentError::FailedPrecondition(format!(
                "cannot {} container {id}: it is {}",
                if paused { "pause" } else { "resume" },
                status_word(s)
            ))),
        }
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), AgentError> {
        let c = self.container(id)?;
        let resources = spec::resources(resources_json)?;
        if c.init.exited().is_some() {
            return Err(AgentError::FailedPrecondition(format!("container {id} is stopped")));
        }
        c.cgroup.update(&resources)
    }

    pub fn stats(&self, id: &str) -> Result<husk_proto::ContainerStatsResponse, AgentError> {
        Ok(self.container(id)?.cgroup.stats())
    }

    pub fn processes(&self, id: &str) -> Result<Vec<husk_proto::ProcessInfo>, AgentError> {
        let c = self.container(id)?;
        Ok(c.cgroup.pids().into_iter().filter_map(procfs::process_info).collect())
    }

    pub fn list(&self) -> Vec<husk_proto::ContainerInfo> {
        lock(&self.containers)
            .values()
            .flatten()
            .map(|c| husk_proto::ContainerInfo {
                container_id: c.id.clone(),
                status: c.status().into(),
                pid: c.init.pid as u32,
            })
            .collect()
    }

    // ---- processes --------------------------------------------------------------------------

    pub async fn exec(&self, req: husk_proto::ExecProcessRequest) -> Result<u32, AgentError> {
        let c = self.container(&req.container_id)?;
        validate::name("exec id", &req.exec_id)?;
        c.require_running("exec")?;
        if lock(&c.execs).contains_key(&req.exec_id) {
            return Err(AgentError::AlreadyExists(format!(
                "exec {} already exists in {}",
                req.exec_id, c.id
            )));
        }
        let stdio = req.stdio.unwrap_or_default();
        let mut process = spec::exec_process(&req.oci_process_json, stdio.terminal, &c.process)?;
        let drop_to = c.seccomp.as_ref().and_then(|_| crate::confine::lift_for_seccomp(&mut process));
        let dir = self.cfg.state_dir.join("execs").join(&c.id);
        std::fs::create_dir_all(&dir).map_err(AgentError::io("creating the exec dir"))?;
        let process_json = dir.join(format!("{}.json", req.exec_id));
        let json = serde_json::to_vec(&process)
            .map_err(|e| AgentError::Internal(format!("encoding process: {e}")))?;
        std::fs::write(&process_json, json).map_err(AgentError::io("writing the process json"))?;
        let console = self.console_path();
        let op = Op::Exec {
            root: self.lc_root(),
            id: c.id.clone(),
            process_json: process_json.clone(),
            console_socket: stdio.terminal.then(|| console.clone()),
            start: Box::new(crate::confine::ConfinedExec { seccomp: c.seccomp.clone(), drop_to }),
        };
        let result = self.run_process(op, &stdio, &console).await;
        let _ = std::fs::remove_file(&process_json);
        let (p, lifeline) = result?;
        if let Some(fd) = lifeline {
            let pid = p.pid;
            let watched = lifeline::watch(fd, p.exit.clone(), move || {
                // SAFETY: kill(2); the watch saw the PID unreaped just before.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            });
            if let Err(e) = watched {
                tracing::warn!("exec {} in {}: no lifeline: {e}", req.exec_id, c.id);
            }
        }
        self.spawn_exit_event(&c.id, &req.exec_id, &p);
        let pid = p.pid;
        lock(&c.execs).insert(req.exec_id, p);
        Ok(pid as u32)
    }

    fn process(&self, container_id: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Proc>), AgentError> {
        validate::exec_id(exec_id)?;
        let c = self.container(container_id)?;
        let p = c.process(exec_id)?;
        Ok((c, p))
    }

    pub fn signal(&self, req: &husk_proto::SignalProcessRequest) -> Result<(), AgentError> {
        if !(1..=64).contains(&req.signal) {
            return Err(AgentError::InvalidArgument(format!("signal {} is not 1-64", req.signal)));
        }
        let (c, p) = self.process(&req.container_id, &req.exec_id)?;
        if req.all {
            for pid in c.cgroup.pids() {
                // SAFETY: kill(2) with a validated signal number.
                unsafe { libc::kill(pid, req.signal) };
            }
            return Ok(());
        }
        if p.exited().is_some() {
            return Err(AgentError::FailedPrecondition(format!("process {} has exited", p.pid)));
        }
        // SAFETY: kill(2) with a validated signal number; the PID is ours and not yet reaped.
        if unsafe { libc::kill(p.pid, req.signal) } < 0 {
            return Err(AgentError::io("kill")(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    pub async fn wait(&self, container_id: &str, exec_id: &str) -> Result<ExitStatus, AgentError> {
        let (_, p) = self.process(container_id, exec_id)?;
        reaper::wait(p.exit.clone()).await.ok_or_else(|| AgentError::Internal("exit status lost".into()))
    }

    pub fn resize(&self, req: &husk_proto::ResizeTtyRequest) -> Result<(), AgentError> {
        let (_, p) = self.process(&req.container_id, &req.exec_id)?;
        let tty = p
            .tty
            .as_ref()
            .ok_or_else(|| AgentError::FailedPrecondition("the process has no terminal".into()))?;
        tty::resize(tty, req.rows, req.cols)
    }

    pub fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let (_, p) = self.process(container_id, exec_id)?;
        if let Some(master) = &p.tty {
            // ^D: the line discipline turns it into EOF for a reader in canonical mode.
            nix::unistd::write(master, b"\x04").map_err(AgentError::errno("writing EOF to the tty"))?;
            return Ok(());
        }
        if let Some(copy) = lock(&p.stdin).take() {
            // Ends the copy, which closes the pipe's write end: the process reads EOF.
            copy.abort();
        }
        Ok(())
    }
}

/// The streams a request names (none: /dev/null), claimed from the registry.
struct StdioFds {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    lifeline: Option<OwnedFd>,
    terminal: bool,
}

impl StdioFds {
    fn claim(registry: &StdioRegistry, s: &Stdio) -> Result<Self, AgentError> {
        if s.terminal && !s.stderr.is_empty() {
            return Err(AgentError::InvalidArgument(
                "with a terminal, stderr goes to stdout; leave stderr empty".into(),
            ));
        }
        for name in [&s.stdin, &s.stdout, &s.stderr, &s.lifeline] {
            if !name.is_empty() {
                validate::name("stdio stream name", name)?;
            }
        }
        let take = |n: &str| if n.is_empty() { Ok(None) } else { registry.take(n).map(Some) };
        Ok(Self {
            stdin: take(&s.stdin)?,
            stdout: take(&s.stdout)?,
            stderr: take(&s.stderr)?,
            lifeline: take(&s.lifeline)?,
            terminal: s.terminal,
        })
    }

    fn null() -> Result<OwnedFd, AgentError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .map_err(AgentError::io("/dev/null"))
    }

    fn null_triple() -> Result<[OwnedFd; 3], AgentError> {
        Ok([Self::null()?, Self::null()?, Self::null()?])
    }

    /// fds 0–2 for the helper (and so the process): pipes bridged to the streams, or
    /// /dev/null; with a terminal the pty replaces them and the streams stay for its relay.
    /// Also returns the stdin copy, for CloseStdin.
    fn process_stdio(&mut self) -> Result<([OwnedFd; 3], Option<AbortHandle>), AgentError> {
        if self.terminal {
            return Ok((Self::null_triple()?, None));
        }
        let (stdin, copy) = match self.stdin.take() {
            Some(s) => {
                let (r, h) = pipes::input(s)?;
                (r, Some(h))
            }
            None => (Self::null()?, None),
        };
        let out = |s: Option<OwnedFd>| s.map(pipes::output).unwrap_or_else(Self::null);
        Ok(([stdin, out(self.stdout.take())?, out(self.stderr.take())?], copy))
    }
}

fn check_hostname(h: &str) -> Result<(), AgentError> {
    let ok = h.len() <= 64 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!("hostname {h:?} is not up to 64 of [A-Za-z0-9.-]")))
    }
}
