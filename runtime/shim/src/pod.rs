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
use husk_core::vm::{VmProcess, Vms};
use husk_core::{CreateOpts, ExecOpts, Held, Runtime, RuntimeError};
use husk_proto as pb;
use tokio::sync::watch;

use crate::events::Events;
use crate::io::{self, Copies, Stdio};
use crate::options::Options;

/// Builds the pod's lifecycle from the config file the runtime options name (or husk's usual
/// places): over husk-vmm in the shim, over a fake in unit tests.
pub type MakeRuntime<V> = Box<dyn Fn(Option<&Path>) -> Result<Runtime<V>, RuntimeError> + Send + Sync>;

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

pub struct Pod<V: Vms = HuskVmm> {
    make_rt: MakeRuntime<V>,
    /// Built at the first Create, from its runtime options.
    rt: tokio::sync::OnceCell<Arc<Runtime<V>>>,
    pub events: Arc<Events>,
    pub exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Container>>,
}

impl<V: Vms> std::fmt::Debug for Pod<V> {
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

impl<V: Vms> Pod<V> {
    pub fn new(make_rt: MakeRuntime<V>, events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            make_rt,
            rt: tokio::sync::OnceCell::new(),
            events: Arc::new(events),
            exit,
            containers: Mutex::new(HashMap::new()),
        }
    }

    /// The lifecycle, configured by the first Create's options (or husk's defaults).
    pub async fn rt(&self) -> Result<Arc<Runtime<V>>, RuntimeError> {
        self.rt_with(&Options::default()).await
    }

    async fn rt_with(&self, opts: &Options) -> Result<Arc<Runtime<V>>, RuntimeError> {
        let rt = self
            .rt
            .get_or_try_init(|| async { (self.make_rt)(opts.config_path.as_deref()).map(Arc::new) })
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
        rt: Arc<Runtime<V>>,
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
    fn attach(
        &self,
        rt: Arc<Runtime<V>>,
        id: &str,
        exec_id: &str,
        held: Held,
        stdio: &Stdio,
        proc_: &mut Proc,
    ) {
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
        let Held { target, guest_pid, guest, vm, started } = held;
        let held = Held { target, guest_pid, guest, vm: VmProcess::default(), started };
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
    fn watch_ooms(&self, rt: Arc<Runtime<V>>, id: &str) {
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
        let spec = opts.process_json.clone();
        let held = match rt.exec(id, opts).await {
            Ok(Some(h)) => h,
            r => {
                // It never ran: it stays deletable (and startable) as before this call.
                if let Ok(p) = exec_mut(&mut self.table(), id, exec_id) {
                    p.pending = Some(spec);
                }
                return Err(r
                    .err()
                    .unwrap_or_else(|| RuntimeError::Internal("a held exec returned no streams".into())));
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::topics;
    use husk_core::agent::fake::{process_key, Fake};
    use husk_core::config::Config;
    use husk_core::state::StateDir;
    use husk_proto as pb;

    /// Pod containers bind their rootfs into the VM share: that needs root. In strict mode (CI)
    /// a missing prerequisite fails instead of skipping.
    fn root_or_skip() -> bool {
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(
            std::env::var_os("HUSK_TESTS_STRICT").is_none(),
            "the shim's pod tests need root (bind mounts)"
        );
        eprintln!("skipped: the shim's pod tests need root (bind mounts)");
        false
    }

    struct Fixture {
        dir: PathBuf,
        pod: Pod<Fake>,
        fake: Fake,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("husk-shim-pod-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("mkdir");
            let fake = Fake::default();
            let (state, f) = (dir.join("state"), fake.clone());
            let make: MakeRuntime<Fake> = Box::new(move |_config: Option<&Path>| {
                Ok(Runtime::new(StateDir::new(state.clone())?, Config::load()?, f.clone()))
            });
            let pod = Pod::new(make, Events::recorded(), Arc::new(ExitSignal::default()));
            Self { dir, pod, fake }
        }

        /// A bundle for container `id` with these annotations.
        fn bundle(&self, id: &str, annotations: serde_json::Value) -> PathBuf {
            let b = self.dir.join("bundles").join(id);
            std::fs::create_dir_all(b.join("rootfs")).expect("rootfs");
            let spec = serde_json::json!({
                "ociVersion": "1.0.2",
                "process": {"args": ["sleep", "300"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
                "root": {"path": "rootfs"},
                "annotations": annotations,
                "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "network"}, {"type": "mount"}]},
            });
            std::fs::write(b.join("config.json"), spec.to_string()).expect("config.json");
            b
        }

        async fn create(&self, id: &str, annotations: serde_json::Value) -> Result<u32, RuntimeError> {
            let b = self.bundle(id, annotations);
            self.pod.create(id, &b, &[], Stdio::default(), &Options::default()).await
        }

        fn topics(&self) -> Vec<(String, String, Option<u32>)> {
            self.pod.events.seen()
        }

        /// Nothing of the pod is left: no container known, no VM, no state, no mount.
        fn assert_gone(&self) {
            assert!(self.pod.is_empty(), "the pod still has containers");
            let w = self.fake.world();
            assert!(w.running_vms.is_empty(), "a VM still runs");
            let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
            assert!(
                !mounts.contains(&self.dir.display().to_string()),
                "a mount is left under {}",
                self.dir.display()
            );
            let left: Vec<_> = ["containers", "sandboxes"]
                .iter()
                .flat_map(|d| std::fs::read_dir(self.dir.join("state").join(d)).into_iter().flatten())
                .flatten()
                .map(|e| e.path())
                .collect();
            assert!(left.is_empty(), "state left: {left:?}");
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = husk_core::mounts::unmount_under(&self.dir);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn exec_spec() -> Vec<u8> {
        br#"{"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#.to_vec()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_container_and_its_exec_live_and_go_with_their_events() {
        if !root_or_skip() {
            return;
        }
        let f = Fixture::new("lives");
        let pid = f.create("c1", serde_json::json!({})).await.expect("create");
        assert_eq!(f.pod.state("c1", "").await.expect("state").status, Status::Created);
        assert_eq!(f.pod.start("c1", "").await.expect("start"), pid);
        assert_eq!(f.pod.state("c1", "").await.expect("state").status, Status::Running);

        f.pod.exec("c1", "e1", exec_spec(), Stdio::default()).await.expect("exec");
        assert_eq!(f.pod.state("c1", "e1").await.expect("state").status, Status::Created);
        f.pod.start("c1", "e1").await.expect("start exec");
        // An exec that ends by itself: its exit is seen by Wait and State.
        f.fake
            .world()
            .exits
            .insert(process_key("c1", "e1"), pb::ExitStatus { exit_code: 3, ..Default::default() });
        assert_eq!(f.pod.wait("c1", "e1").await.expect("wait").code, 3);
        assert_eq!(f.pod.state("c1", "e1").await.expect("state").status, Status::Stopped);
        assert_eq!(f.pod.delete("c1", "e1").await.expect("delete exec").1.code, 3);

        // SIGTERM reaches the guest; SIGKILL ends the init, and a second kill is answered from
        // the exit the shim saw.
        f.pod.kill("c1", "", libc::SIGTERM as u32, false).await.expect("term");
        f.pod.kill("c1", "", libc::SIGKILL as u32, false).await.expect("kill");
        assert_eq!(f.pod.wait("c1", "").await.expect("wait").code, 137);
        let e = f.pod.kill("c1", "", libc::SIGKILL as u32, false).await.expect_err("already finished");
        assert!(e.to_string().contains("already finished"), "{e}");
        let sigs: Vec<i32> = f.fake.world().signals.iter().map(|(_, s)| *s).collect();
        assert_eq!(sigs, [libc::SIGTERM, libc::SIGKILL]);

        let (_, exit) = f.pod.delete("c1", "").await.expect("delete");
        assert_eq!(exit.code, 137);
        assert_eq!(f.fake.world().power_offs, 1, "the last container's delete powers the VM off");
        let want = [
            (topics::TASK_CREATE_EVENT_TOPIC, "c1", None),
            (topics::TASK_START_EVENT_TOPIC, "c1", None),
            (topics::TASK_EXEC_ADDED_EVENT_TOPIC, "c1", None),
            (topics::TASK_EXEC_STARTED_EVENT_TOPIC, "c1", None),
            (topics::TASK_EXIT_EVENT_TOPIC, "c1/e1", Some(3)),
            (topics::TASK_EXIT_EVENT_TOPIC, "c1", Some(137)),
            (topics::TASK_DELETE_EVENT_TOPIC, "c1", Some(137)),
        ];
        let want: Vec<_> = want.iter().map(|(t, i, c)| (t.to_string(), i.to_string(), *c)).collect();
        assert_eq!(f.topics(), want);
        f.assert_gone();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_requests_get_clear_errors_and_leave_nothing() {
        if !root_or_skip() {
            return;
        }
        let f = Fixture::new("bad");
        // A pod member whose sandbox is gone.
        let member = serde_json::json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "gone",
        });
        let e = f.create("m1", member).await.expect_err("no sandbox");
        assert!(e.to_string().contains("sandbox gone does not exist"), "{e}");
        f.assert_gone();

        f.create("c1", serde_json::json!({})).await.expect("create");
        f.pod.start("c1", "").await.expect("start");
        // A signal that is no signal, a process that does not exist, a second exec of one id.
        let e = f.pod.kill("c1", "", 1 << 31, false).await.expect_err("bad signal");
        assert!(matches!(e, RuntimeError::InvalidArgument(_)), "{e}");
        assert!(f.pod.kill("c1", "nope", 9, false).await.is_err());
        assert!(matches!(f.pod.state("nope", "").await, Err(RuntimeError::NotFound(_))));
        f.pod.exec("c1", "e1", exec_spec(), Stdio::default()).await.expect("exec");
        assert!(matches!(
            f.pod.exec("c1", "e1", exec_spec(), Stdio::default()).await,
            Err(RuntimeError::Exists(_))
        ));
        // An exec into a task that has stopped.
        f.pod.kill("c1", "", libc::SIGKILL as u32, false).await.expect("kill");
        f.pod.wait("c1", "").await.expect("wait");
        let e = f.pod.start("c1", "e1").await.expect_err("exec into a stopped task");
        assert!(e.to_string().contains("stopped container"), "{e}");
        f.pod.delete("c1", "e1").await.expect("delete the exec that never ran");
        f.pod.delete("c1", "").await.expect("delete");
        f.assert_gone();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pod_is_one_vm_until_its_last_container_goes() {
        if !root_or_skip() {
            return;
        }
        let f = Fixture::new("pod");
        let sb = serde_json::json!({"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "p1"});
        let member = serde_json::json!({"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "p1"});
        f.create("p1", sb).await.expect("sandbox");
        f.pod.start("p1", "").await.expect("start sandbox");
        f.create("m1", member).await.expect("member");
        f.pod.start("m1", "").await.expect("start member");
        assert_eq!(f.fake.world().boots, 1);
        f.pod.kill("m1", "", libc::SIGKILL as u32, false).await.expect("kill member");
        f.pod.wait("m1", "").await.expect("wait member");
        f.pod.delete("m1", "").await.expect("delete member");
        assert_eq!(f.fake.world().power_offs, 0, "the VM stays for the sandbox");
        f.pod.kill("p1", "", libc::SIGKILL as u32, false).await.expect("kill sandbox");
        f.pod.delete("p1", "").await.expect("delete sandbox");
        assert_eq!(f.fake.world().power_offs, 1);
        f.assert_gone();
    }
}
