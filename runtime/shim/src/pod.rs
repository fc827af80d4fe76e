//! What one shim holds: the containers of its pod and their processes, each with its stdio
//! copies and its exit. Lifecycle calls go to husk-core; this keeps only what containerd asks
//! about that the core does not record (FIFO paths, exit times, exec specs before start).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use containerd_shim::ExitSignal;
use husk_core::agent::Status;
use husk_core::bundle::Bundle;
use husk_core::relay::Outcome;
use husk_core::stdio::StdioStrategy;
use husk_core::vm::husk_vmm::HuskVmm;
use husk_core::vm::VmProcess;
use husk_core::{CreateOpts, ExecOpts, Held, Runtime, RuntimeError};
use husk_proto as pb;
use tokio::sync::watch;

use crate::events::Events;
use crate::io::{self, Copies, Stdio};
use crate::options::Options;

pub type Rt = Runtime<HuskVmm>;

/// How long output may keep draining after a process has exited.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How a process ended.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub code: u32,
    pub at: SystemTime,
}

#[derive(Debug)]
struct Proc {
    pid: u32,
    stdio: Stdio,
    /// An exec's process JSON, until it starts.
    pending: Option<Vec<u8>>,
    exit: watch::Receiver<Option<Exit>>,
    exit_tx: Option<watch::Sender<Option<Exit>>>,
    /// Held until the process is deleted (see `Copies::lifeline`).
    lifeline: Option<std::os::unix::net::UnixStream>,
}

impl Proc {
    fn new(stdio: Stdio, pending: Option<Vec<u8>>) -> Self {
        let (tx, rx) = watch::channel(None);
        Self { pid: 0, stdio, pending, exit: rx, exit_tx: Some(tx), lifeline: None }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    /// `<bundle>/rootfs` when this shim mounted containerd's rootfs mounts there.
    mounted: Option<PathBuf>,
    init: Proc,
    execs: HashMap<String, Proc>,
    vm: VmProcess,
}

/// A process's state as containerd's State call reports it.
#[derive(Debug, Clone)]
pub struct ProcState {
    pub pid: u32,
    pub status: Status,
    pub stdio: Stdio,
    pub exit: Option<Exit>,
    pub bundle: PathBuf,
}

pub struct Pod {
    namespace: String,
    /// Built at the first Create, from its runtime options.
    rt: tokio::sync::OnceCell<Arc<Rt>>,
    pub events: Arc<Events>,
    pub exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Container>>,
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod").field("containers", &self.table().len()).finish_non_exhaustive()
    }
}

fn not_found(what: String) -> RuntimeError {
    RuntimeError::NotFound(what)
}

/// Process `exec_id` of container `id` (its init when `exec_id` is empty).
fn proc_ref<'a>(
    t: &'a HashMap<String, Container>,
    id: &str,
    exec_id: &str,
) -> Result<&'a Proc, RuntimeError> {
    let c = t.get(id).ok_or_else(|| not_found(id.into()))?;
    if exec_id.is_empty() {
        return Ok(&c.init);
    }
    c.execs.get(exec_id).ok_or_else(|| not_found(format!("{id}/{exec_id}")))
}

/// Exec `exec_id` of container `id`.
fn exec_mut<'a>(
    t: &'a mut HashMap<String, Container>,
    id: &str,
    exec_id: &str,
) -> Result<&'a mut Proc, RuntimeError> {
    let c = t.get_mut(id).ok_or_else(|| not_found(id.into()))?;
    c.execs.get_mut(exec_id).ok_or_else(|| not_found(format!("{id}/{exec_id}")))
}

/// Mounts containerd's rootfs mounts (the snapshotter's overlay or binds) on `target`.
fn mount_rootfs(
    mounts: &[containerd_shim::protos::types::mount::Mount],
    target: &Path,
) -> Result<(), RuntimeError> {
    std::fs::create_dir_all(target).map_err(RuntimeError::io(format!("creating {}", target.display())))?;
    for m in mounts {
        containerd_shim::mount::mount_rootfs(Some(&m.type_), Some(&m.source), &m.options, target).map_err(
            |e| RuntimeError::Bundle(format!("mounting the rootfs ({} {}): {e}", m.type_, m.source)),
        )?;
    }
    Ok(())
}

fn unmount_rootfs(target: &Path) {
    if let Err(e) = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!("unmounting {}: {e}", target.display());
    }
}

impl Pod {
    pub fn new(namespace: String, events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            namespace,
            rt: tokio::sync::OnceCell::new(),
            events: Arc::new(events),
            exit,
            containers: Mutex::new(HashMap::new()),
        }
    }

    /// The lifecycle, configured by the first Create's options (or husk's defaults).
    pub async fn rt(&self) -> Result<Arc<Rt>, RuntimeError> {
        self.rt_with(&Options::default()).await
    }

    async fn rt_with(&self, opts: &Options) -> Result<Arc<Rt>, RuntimeError> {
        let rt = self
            .rt
            .get_or_try_init(|| async {
                crate::shim::runtime(&self.namespace, opts.config_path.as_deref()).map(Arc::new)
            })
            .await?;
        Ok(rt.clone())
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the process behind `held` off the call path: output drains first, then the
    /// exit is recorded and published.
    fn watch_exit(
        &self,
        rt: Arc<Rt>,
        id: &str,
        exec_id: &str,
        pid: u32,
        mut copies: Copies,
        tx: watch::Sender<Option<Exit>>,
    ) {
        let events = self.events.clone();
        let (id, exec_id) = (id.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            let outcome = match rt.wait(&id, &exec_id).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!("{id}/{exec_id}: wait: {e}");
                    Outcome::Lost
                }
            };
            if !copies.drained(DRAIN_GRACE).await {
                tracing::debug!("{id}/{exec_id}: output still open {DRAIN_GRACE:?} after exit");
            }
            let exit = Exit { code: outcome.code() as u32, at: SystemTime::now() };
            tx.send_replace(Some(exit));
            events.exited(&id, &exec_id, pid, exit.code, exit.at).await;
        });
    }

    /// Starts copies and the exit watch of a process the core created with held streams.
    fn attach(&self, rt: Arc<Rt>, id: &str, exec_id: &str, held: Held, stdio: &Stdio, proc_: &mut Proc) {
        let mut copies = io::start(held.guest, stdio);
        proc_.pid = held.guest_pid;
        proc_.lifeline = copies.lifeline.take();
        if let Some(tx) = proc_.exit_tx.take() {
            self.watch_exit(rt, id, exec_id, held.guest_pid, copies, tx);
        }
    }

    pub async fn create(
        &self,
        id: &str,
        bundle_dir: &Path,
        rootfs: &[containerd_shim::protos::types::mount::Mount],
        stdio: Stdio,
        opts: &Options,
    ) -> Result<u32, RuntimeError> {
        let rt = self.rt_with(opts).await?;
        if self.table().contains_key(id) {
            return Err(RuntimeError::Exists(id.into()));
        }
        let mounted = if rootfs.is_empty() {
            None
        } else {
            let target = bundle_dir.join("rootfs");
            mount_rootfs(rootfs, &target)?;
            Some(target)
        };
        let created = async {
            let bundle = Bundle::load(bundle_dir)?;
            if bundle.terminal() != stdio.terminal {
                return Err(RuntimeError::InvalidArgument(
                    "the task's terminal flag and the spec's differ".into(),
                ));
            }
            let mut opts = CreateOpts::new(StdioStrategy::Held { size: None });
            // containerd is told guest PIDs, and names pod peers' namespaces by them.
            opts.clients_see_guest_pids = true;
            rt.create(id, &bundle, opts).await
        }
        .await;
        let held = match created {
            Ok(Some(h)) => h,
            Ok(None) => {
                return Err(RuntimeError::Internal("a held create returned no streams".into()));
            }
            Err(e) => {
                if let Some(m) = &mounted {
                    unmount_rootfs(m);
                }
                return Err(e);
            }
        };
        let mut init = Proc::new(stdio.clone(), None);
        let Held { target, guest_pid, guest, vm } = held;
        let held = Held { target, guest_pid, guest, vm: VmProcess::default() };
        self.attach(rt.clone(), id, "", held, &stdio, &mut init);
        let pid = init.pid;
        let first = self.table().is_empty();
        self.table().insert(
            id.into(),
            Container { bundle: bundle_dir.to_path_buf(), mounted, init, execs: HashMap::new(), vm },
        );
        if first {
            self.watch_ooms(rt, id);
        }
        self.events.created(id, &bundle_dir.display().to_string(), pid).await;
        Ok(pid)
    }

    /// OOM kills in the pod's VM become TaskOOM events.
    fn watch_ooms(&self, rt: Arc<Rt>, id: &str) {
        let (events, id) = (self.events.clone(), id.to_string());
        tokio::spawn(async move {
            let mut stream = match rt.events(&id).await {
                Ok(s) => s,
                Err(e) => return tracing::warn!("{id}: event stream: {e}"),
            };
            while let Some(ev) = stream.recv().await {
                match ev {
                    Ok(pb::Event { kind: Some(pb::event::Kind::Oom(o)) }) => {
                        events.oom(&o.container_id).await
                    }
                    Ok(_) => {}
                    Err(e) => return tracing::debug!("{id}: event stream ended: {e}"),
                }
            }
        });
    }

    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, RuntimeError> {
        if exec_id.is_empty() {
            let pid = self.table().get(id).map(|c| c.init.pid).ok_or_else(|| not_found(id.into()))?;
            self.rt().await?.start(id).await?;
            self.events.started(id, pid).await;
            return Ok(pid);
        }
        let (spec, stdio) = {
            let mut t = self.table();
            let p = exec_mut(&mut t, id, exec_id)?;
            let spec = p
                .pending
                .take()
                .ok_or_else(|| RuntimeError::WrongState(format!("exec {exec_id} already started")))?;
            (spec, p.stdio.clone())
        };
        let opts = ExecOpts {
            process_json: spec,
            terminal: stdio.terminal,
            stdio: StdioStrategy::Held { size: None },
            ignore_paused: false,
            exec_id: Some(exec_id.to_string()),
        };
        let rt = self.rt().await?;
        let Some(held) = rt.exec(id, opts).await? else {
            return Err(RuntimeError::Internal("a held exec returned no streams".into()));
        };
        let pid = {
            let mut t = self.table();
            let p = exec_mut(&mut t, id, exec_id)?;
            self.attach(rt.clone(), id, exec_id, held, &stdio, p);
            p.pid
        };
        self.events.exec_started(id, exec_id, pid).await;
        Ok(pid)
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        spec_json: Vec<u8>,
        stdio: Stdio,
    ) -> Result<(), RuntimeError> {
        husk_core::state::check_id(exec_id)?;
        {
            let mut t = self.table();
            let c = t.get_mut(id).ok_or_else(|| not_found(id.into()))?;
            if c.execs.contains_key(exec_id) {
                return Err(RuntimeError::Exists(format!("{id}/{exec_id}")));
            }
            c.execs.insert(exec_id.into(), Proc::new(stdio, Some(spec_json)));
        }
        self.events.exec_added(id, exec_id).await;
        Ok(())
    }

    /// Checks that this shim knows the process (containerd's exec ids are the guest's too).
    fn known(&self, id: &str, exec_id: &str) -> Result<(), RuntimeError> {
        proc_ref(&self.table(), id, exec_id).map(drop)
    }

    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), RuntimeError> {
        let signal =
            i32::try_from(signal).map_err(|_| RuntimeError::InvalidArgument(format!("signal {signal}")))?;
        // An exit already seen needs no call to the guest.
        if let Some(e) = proc_ref(&self.table(), id, exec_id)?.exited() {
            return Err(RuntimeError::NotFound(format!("process already finished (exit status {})", e.code)));
        }
        self.rt().await?.signal_process(id, exec_id, signal, all).await
    }

    pub async fn state(&self, id: &str, exec_id: &str) -> Result<ProcState, RuntimeError> {
        let (pid, stdio, exit, bundle, started) = {
            let t = self.table();
            let p = proc_ref(&t, id, exec_id)?;
            let bundle = t.get(id).map(|c| c.bundle.clone()).unwrap_or_default();
            (p.pid, p.stdio.clone(), p.exited(), bundle, p.pending.is_none())
        };
        let status = match (exit, exec_id.is_empty()) {
            (Some(_), _) => Status::Stopped,
            (None, true) => {
                let rt = self.rt().await?;
                let rec = rt.state.read_container(id)?;
                rt.status(&rec).await?.0
            }
            (None, false) if started => Status::Running,
            (None, false) => Status::Created,
        };
        Ok(ProcState { pid, status, stdio, exit, bundle })
    }

    /// Waits for the process's exit.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, RuntimeError> {
        let mut rx = proc_ref(&self.table(), id, exec_id)?.exit.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return Ok(e);
            }
            if rx.changed().await.is_err() {
                return Err(RuntimeError::Internal(format!("{id}/{exec_id}: the exit watch went away")));
            }
        }
    }

    /// Deletes an exec's record, or the container (from its VM and the host).
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<(u32, Exit), RuntimeError> {
        if !exec_id.is_empty() {
            let mut t = self.table();
            let p = exec_mut(&mut t, id, exec_id)?;
            if p.exited().is_none() && p.pending.is_none() {
                return Err(RuntimeError::WrongState(format!("exec {exec_id} is still running")));
            }
            let p = t
                .get_mut(id)
                .and_then(|c| c.execs.remove(exec_id))
                .ok_or_else(|| not_found(format!("{id}/{exec_id}")))?;
            let exit = p.exited().unwrap_or(Exit { code: 0, at: SystemTime::now() });
            return Ok((p.pid, exit));
        }
        let vm = {
            let mut t = self.table();
            let c = t.get_mut(id).ok_or_else(|| not_found(id.into()))?;
            std::mem::take(&mut c.vm)
        };
        self.rt().await?.delete(id, true, vm).await?;
        let c = self.table().remove(id);
        let Some(c) = c else { return Err(not_found(id.into())) };
        if let Some(m) = &c.mounted {
            unmount_rootfs(m);
        }
        let exit = c.init.exited().unwrap_or(Exit { code: 137, at: SystemTime::now() });
        self.events.deleted(id, c.init.pid, exit.code, exit.at).await;
        Ok((c.init.pid, exit))
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), RuntimeError> {
        self.known(id, exec_id)?;
        self.rt().await?.close_stdin(id, exec_id).await
    }

    pub async fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<(), RuntimeError> {
        self.known(id, exec_id)?;
        self.rt().await?.resize(id, exec_id, rows, cols).await
    }

    pub fn init_pid(&self, id: &str) -> Option<u32> {
        self.table().get(id).map(|c| c.init.pid)
    }

    pub fn is_empty(&self) -> bool {
        self.table().is_empty()
    }
}
