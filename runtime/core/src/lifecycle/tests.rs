//! The lifecycle against the fake agent and VMs: rollback at every failing step, wrong-state
//! calls, concurrent deletes, and a sandbox's CNI network taken down however it ends.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;
use crate::agent::fake::{Fake, Step};
use crate::bundle::Bundle;
use crate::cni::testing::{FakePlugins, RESULT};
use crate::cni::Attachment;
use crate::vm::PowerOff;

struct Fixture {
    dir: PathBuf,
    rt: Runtime<Fake>,
    fake: Fake,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("husk-lifecycle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bundle/rootfs")).expect("mkdir");
        let fake = Fake::default();
        let state = StateDir::new(dir.join("state")).expect("state");
        let rt = Runtime::new(state, Config::load().expect("config"), fake.clone());
        Self { dir, rt, fake }
    }

    fn bundle(&self, extra: serde_json::Value) -> Bundle {
        let mut spec = json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "network"}, {"type": "mount"}]},
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        Bundle::from_spec(self.dir.join("bundle"), serde_json::from_value(spec).expect("spec"))
            .expect("bundle")
    }

    /// Held stdio and the rootfs from a share of its own: no relay process, no host mounts.
    fn opts() -> CreateOpts {
        let mut o = CreateOpts::new(StdioStrategy::Held { size: None });
        o.rootfs_share = Some(("rootfs".into(), String::new()));
        o
    }

    /// Nothing of container `id` (or a sandbox of that name) is left anywhere.
    fn assert_gone(&self, id: &str) {
        assert!(!self.rt.state.container_dir(id).exists(), "container dir of {id} left");
        assert!(!self.rt.state.sandbox_dir(id).exists(), "sandbox dir of {id} left");
        let w = self.fake.world();
        assert!(w.running_vms.is_empty(), "a VM still runs: {:?}", w.running_vms);
        assert!(w.containers.is_empty(), "the agent still has {:?}", w.containers);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn exec_opts(ignore_paused: bool) -> ExecOpts {
    ExecOpts {
        process_json: br#"{"args":["true"],"cwd":"/"}"#.to_vec(),
        terminal: false,
        stdio: StdioStrategy::Held { size: None },
        ignore_paused,
        exec_id: None,
    }
}

/// The annotations CRI gives a pod's sandbox container.
fn sandbox_of(pod: &str) -> serde_json::Value {
    json!({"annotations": {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": pod}})
}

/// The annotations CRI gives a container of pod `pod`.
fn member_of(pod: &str) -> serde_json::Value {
    json!({"annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": pod}})
}

async fn status(f: &Fixture, id: &str) -> Status {
    let rec = f.rt.state.read_container(id).expect("record");
    f.rt.status(&rec).await.expect("status").0
}

#[tokio::test]
async fn a_container_lives_and_goes() {
    let f = Fixture::new("life");
    let b = f.bundle(json!({}));
    let held = f.rt.create("c1", &b, Fixture::opts()).await.expect("create").expect("held streams");
    assert_eq!(held.target.container_id, "c1");
    assert_eq!(status(&f, "c1").await, Status::Created);
    f.rt.start("c1").await.expect("start");
    assert_eq!(status(&f, "c1").await, Status::Running);
    assert!(f.rt.exec("c1", exec_opts(false)).await.expect("exec").is_some());
    f.rt.pause("c1").await.expect("pause");
    assert_eq!(status(&f, "c1").await, Status::Paused);
    f.rt.resume("c1").await.expect("resume");
    f.rt.delete("c1", true, held.vm).await.expect("delete");
    f.assert_gone("c1");
    let w = f.fake.world();
    assert_eq!(w.power_offs, 1);
    assert_eq!(w.discards, 0, "a running container's VM was stopped without the guest's cleanup");
}

#[tokio::test]
async fn a_run_starts_its_process_with_the_create_in_one_agent_call() {
    let f = Fixture::new("run-start");
    let marker = f.dir.join("poststart-ran");
    let poststart = json!({"hooks": {
        "poststart": [{"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", marker.display())]}],
    }});
    let mut opts = Fixture::opts();
    opts.start = true;
    let held = f.rt.create("c1", &f.bundle(poststart), opts).await.expect("create").expect("held");
    assert!(held.started, "not started with the create");
    assert_eq!(status(&f, "c1").await, Status::Running);
    f.rt.started("c1").await.expect("started");
    assert_eq!(f.fake.world().starts, 0, "a StartContainer call was made too");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&marker).expect("poststart ran")).expect("state json");
    assert_eq!(state["status"], "running");
    f.rt.delete("c1", true, held.vm).await.expect("delete");
    f.assert_gone("c1");
}

#[tokio::test]
async fn a_run_with_hooks_before_its_start_or_an_agent_that_only_creates_starts_on_its_own() {
    let f = Fixture::new("run-apart");
    let prestart = json!({"hooks": {"prestart": [{"path": "/bin/true"}]}});
    let create_runtime = json!({"hooks": {"createRuntime": [{"path": "/bin/true"}]}});
    for (id, extra, old_agent) in
        [("c1", prestart, false), ("c2", create_runtime, false), ("c3", json!({}), true)]
    {
        f.fake.world().create_never_starts = old_agent;
        let mut opts = Fixture::opts();
        opts.start = true;
        let held = f.rt.create(id, &f.bundle(extra), opts).await.expect("create").expect("held");
        assert!(!held.started, "{id}: started with the create");
        assert_eq!(status(&f, id).await, Status::Created, "{id}");
        f.rt.start(id).await.expect("start");
        assert_eq!(status(&f, id).await, Status::Running, "{id}");
        f.rt.delete(id, true, held.vm).await.expect("delete");
        f.assert_gone(id);
    }
    assert_eq!(f.fake.world().starts, 3);
}

#[tokio::test]
async fn a_container_seen_to_exit_goes_without_a_status_read() {
    let f = Fixture::new("exited");
    let held = f.rt.create("c1", &f.bundle(json!({})), Fixture::opts()).await.expect("create").expect("held");
    f.rt.start("c1").await.expect("start");
    f.fake.world().containers.insert("c1".into(), Status::Stopped);
    let reads = f.fake.world().status_reads;
    f.rt.delete_exited("c1", held.vm).await.expect("delete");
    f.assert_gone("c1");
    let w = f.fake.world();
    assert_eq!(w.status_reads, reads, "the guest was asked again");
    assert_eq!(w.power_offs, 1, "its VM went with it");
    assert_eq!(w.discards, 1, "the guest was asked to clean up after an init that was PID 1");
    assert!(w.removed.is_empty(), "taken apart in the guest before the VM went: {:?}", w.removed);
}

#[tokio::test]
async fn an_exited_container_without_its_own_pid_namespace_has_the_guest_clean_up() {
    // Its processes are not the init's children in a namespace of their own: some may still
    // run and write, so the agent kills them and syncs before the VM stops.
    let f = Fixture::new("sharedpid");
    let b = f.bundle(json!({"linux": {"namespaces": [{"type": "mount"}, {"type": "network"}]}}));
    let held = f.rt.create("c1", &b, Fixture::opts()).await.expect("create").expect("held");
    f.rt.start("c1").await.expect("start");
    f.fake.world().containers.insert("c1".into(), Status::Stopped);
    f.rt.delete_exited("c1", held.vm).await.expect("delete");
    f.assert_gone("c1");
    let w = f.fake.world();
    assert_eq!((w.power_offs, w.discards), (1, 0));
}

#[tokio::test]
async fn a_created_container_that_never_ran_goes_with_its_vm_at_once() {
    let f = Fixture::new("neverran");
    let held = f.rt.create("c1", &f.bundle(json!({})), Fixture::opts()).await.expect("create").expect("held");
    f.rt.delete("c1", false, held.vm).await.expect("delete");
    f.assert_gone("c1");
    let w = f.fake.world();
    assert_eq!((w.power_offs, w.discards), (1, 1));
}

#[tokio::test]
async fn a_process_without_input_gets_no_input_stream() {
    let f = Fixture::new("no-stdin");
    let mut opts = Fixture::opts();
    opts.stdin = false;
    let held = f.rt.create("c1", &f.bundle(json!({})), opts).await.expect("create").expect("held");
    assert!(held.guest.stdin.is_none());
    assert!(held.guest.stdout.is_some() && held.guest.stderr.is_some());
    let opened = f.fake.world().streams.clone();
    assert_eq!(opened.len(), 3, "out, err and the lifeline: {opened:?}");
    assert!(!opened.iter().any(|n| n.starts_with("in")), "{opened:?}");
    f.rt.delete("c1", true, held.vm).await.expect("delete");
    // With input (the default), four.
    let held = f.rt.create("c2", &f.bundle(json!({})), Fixture::opts()).await.expect("create").expect("held");
    assert!(held.guest.stdin.is_some());
    assert_eq!(f.fake.world().streams.len(), 3 + 4);
    f.rt.delete("c2", true, held.vm).await.expect("delete");
}

#[tokio::test]
async fn create_rolls_back_at_each_failing_step() {
    for step in [Step::Boot, Step::OpenStdio, Step::CreateContainer] {
        let f = Fixture::new(&format!("rollback-{step:?}"));
        f.fake.world().fail.insert(step);
        let e = f.rt.create("c1", &f.bundle(json!({})), Fixture::opts()).await.expect_err("fails");
        assert!(e.to_string().contains("fails") || e.to_string().contains("refused"), "{step:?}: {e}");
        f.assert_gone("c1");
        f.fake.world().fail.clear();
        // The id is free again.
        f.rt.create("c1", &f.bundle(json!({})), Fixture::opts()).await.expect("create after rollback");
    }
}

#[tokio::test]
async fn a_failing_prestart_hook_fails_create_and_leaves_nothing() {
    let f = Fixture::new("hook");
    let marker = f.dir.join("ran");
    let hooks = json!({"hooks": {
        "prestart": [{"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", marker.display())]}],
        "createRuntime": [{"path": "/bin/false"}],
        "poststop": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 1"]}],
    }});
    let e = f.rt.create("c1", &f.bundle(hooks), Fixture::opts()).await.expect_err("hook fails").to_string();
    assert!(e.contains("createRuntime hook /bin/false"), "{e}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&marker).expect("prestart ran first")).expect("state json");
    assert_eq!(state["id"], "c1");
    assert_eq!(state["status"], "creating");
    f.assert_gone("c1");
}

#[tokio::test]
async fn calls_in_the_wrong_state_are_refused() {
    let f = Fixture::new("states");
    let b = f.bundle(json!({}));
    f.rt.create("c1", &b, Fixture::opts()).await.expect("create");
    assert!(matches!(f.rt.create("c1", &b, Fixture::opts()).await, Err(RuntimeError::Exists(_))));
    f.rt.start("c1").await.expect("start");
    // The agent refuses the second start; runc's words come from the state asked after.
    let e = f.rt.start("c1").await.expect_err("running");
    assert!(
        matches!(&e, RuntimeError::WrongState(m) if m == "cannot start an already running container"),
        "{e}"
    );
    assert!(matches!(f.rt.kill("c1", 0, false).await, Err(RuntimeError::InvalidArgument(_))));
    assert!(matches!(f.rt.kill("c1", 65, false).await, Err(RuntimeError::InvalidArgument(_))));
    let e = f.rt.delete("c1", false, VmProcess::default()).await.expect_err("running").to_string();
    assert!(e.contains("not stopped"), "{e}");
    // Paused: exec only with ignore_paused.
    f.rt.pause("c1").await.expect("pause");
    assert!(matches!(f.rt.exec("c1", exec_opts(false)).await, Err(RuntimeError::WrongState(_))));
    f.rt.exec("c1", exec_opts(true)).await.expect("exec into a paused container with ignore_paused");
    f.rt.resume("c1").await.expect("resume");
    // Stopped: no exec, no start, kill says runc's words; delete needs no force.
    f.rt.kill("c1", libc::SIGKILL, false).await.expect("kill");
    assert_eq!(status(&f, "c1").await, Status::Stopped);
    let e = f.rt.exec("c1", exec_opts(true)).await.expect_err("stopped").to_string();
    assert!(e.contains("stopped"), "{e}");
    let e = f.rt.kill("c1", libc::SIGTERM, false).await.expect_err("stopped").to_string();
    assert_eq!(e, "container not running");
    let e = f.rt.start("c1").await.expect_err("stopped");
    assert!(
        matches!(&e, RuntimeError::WrongState(m) if m == "cannot start a container that has stopped"),
        "{e}"
    );
    f.rt.delete("c1", false, VmProcess::default()).await.expect("delete a stopped container");
    // Unknown ids.
    assert!(matches!(f.rt.start("nope").await, Err(RuntimeError::NotFound(_))));
    assert!(matches!(f.rt.delete("nope", false, VmProcess::default()).await, Err(RuntimeError::NotFound(_))));
    f.rt.delete("nope", true, VmProcess::default())
        .await
        .expect("force-deleting a missing container succeeds");
    assert!(matches!(f.rt.create("../x", &b, Fixture::opts()).await, Err(RuntimeError::InvalidId(_))));
    f.assert_gone("c1");
}

#[tokio::test]
async fn a_pod_member_needs_its_sandbox() {
    let f = Fixture::new("pod");
    let member = member_of("pod1");
    let e = f.rt.create("m1", &f.bundle(member.clone()), Fixture::opts()).await.expect_err("no sandbox");
    assert!(e.to_string().contains("sandbox pod1 does not exist"), "{e}");
    f.assert_gone("m1");
    f.assert_gone("pod1");
    // With its sandbox, both share one VM, which goes with the last of them.
    let sb = sandbox_of("pod1");
    let held = f.rt.create("pod1", &f.bundle(sb), Fixture::opts()).await.expect("sandbox").expect("held");
    f.rt.create("m1", &f.bundle(member), Fixture::opts()).await.expect("member");
    assert_eq!(f.fake.world().boots, 1);
    f.rt.delete("pod1", true, held.vm).await.expect("delete sandbox");
    assert_eq!(f.fake.world().power_offs, 0, "the VM stays for its member");
    assert_eq!(f.fake.world().removed, ["pod1"], "a container whose VM stays is removed in it");
    f.rt.delete("m1", true, VmProcess::default()).await.expect("delete member");
    assert_eq!(f.fake.world().power_offs, 1);
    assert_eq!(f.fake.world().removed, ["pod1"], "the last container goes with its VM, unremoved");
    f.assert_gone("pod1");
}

#[tokio::test]
async fn the_vm_hears_once_of_its_first_container_before_it_starts() {
    let f = Fixture::new("first-created");
    let held =
        f.rt.create("pod1", &f.bundle(sandbox_of("pod1")), Fixture::opts())
            .await
            .expect("sandbox")
            .expect("held");
    let seen = f.fake.world().first_created.clone();
    assert_eq!(seen, [("pod1".to_string(), vec!["pod1".to_string()])], "after the guest created it");
    assert_eq!(f.fake.world().containers.get("pod1"), Some(&Status::Created), "and before it started");
    f.rt.create("m1", &f.bundle(member_of("pod1")), Fixture::opts()).await.expect("member");
    assert_eq!(f.fake.world().first_created.len(), 1, "a pod's later containers are not the first");
    f.rt.delete("m1", true, VmProcess::default()).await.expect("delete member");
    f.rt.delete("pod1", true, held.vm).await.expect("delete sandbox");
}

#[tokio::test]
async fn a_running_last_container_is_stopped_in_the_guest_before_its_vm_goes() {
    let f = Fixture::new("last-running");
    let held = f.rt.create("c1", &f.bundle(json!({})), Fixture::opts()).await.expect("create").expect("held");
    f.rt.start("c1").await.expect("start");
    f.rt.delete("c1", true, held.vm).await.expect("delete");
    assert_eq!(f.fake.world().removed, ["c1"]);
    assert_eq!(f.fake.world().power_offs, 1);
    f.assert_gone("c1");
    // One that exited goes with its VM.
    let held = f.rt.create("c2", &f.bundle(json!({})), Fixture::opts()).await.expect("create").expect("held");
    f.rt.start("c2").await.expect("start");
    f.fake.world().containers.insert("c2".into(), Status::Stopped);
    f.rt.delete("c2", false, held.vm).await.expect("delete");
    assert_eq!(f.fake.world().removed, ["c1"]);
    assert_eq!(f.fake.world().power_offs, 2);
    f.assert_gone("c2");
}

#[tokio::test]
async fn a_container_left_for_its_vm_is_removed_if_another_joined_meanwhile() {
    let f = Fixture::new("joined");
    let sb = sandbox_of("pod3");
    let member = member_of("pod3");
    f.rt.create("pod3", &f.bundle(sb), Fixture::opts()).await.expect("sandbox");
    // m1 joins after pod3's delete found pod3 the last one and left it in the guest.
    f.rt.create("m1", &f.bundle(member), Fixture::opts()).await.expect("member");
    f.rt.leave_sandbox("pod3", "pod3", VmProcess::default(), Some(&f.fake), PowerOff::Destroy)
        .await
        .expect("leave");
    let w = f.fake.world();
    assert_eq!(w.power_offs, 0, "the VM stays for m1");
    assert_eq!(w.removed, ["pod3"]);
    assert!(w.containers.contains_key("m1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_member_bigger_than_the_pods_vm_is_refused() {
    let f = Fixture::new("too-big");
    // The pod declares 200 MiB: its VM gets that plus the guest's share.
    let sb = json!({"annotations": {
        "io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod2",
        "io.kubernetes.cri.sandbox-memory": (200u64 << 20).to_string(),
    }});
    let held = f.rt.create("pod2", &f.bundle(sb), Fixture::opts()).await.expect("sandbox").expect("held");
    let member = |mib: u64| {
        json!({
            "annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod2"},
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "network"}, {"type": "mount"}],
                "resources": {"memory": {"limit": mib << 20}},
            },
        })
    };
    let e = f.rt.create("big", &f.bundle(member(300)), Fixture::opts()).await.expect_err("too big");
    assert!(e.to_string().contains("300 MiB"), "{e}");
    assert!(!f.rt.state.container_dir("big").exists());
    f.rt.create("fits", &f.bundle(member(200)), Fixture::opts()).await.expect("fits");
    f.rt.start("fits").await.expect("start");
    // An update beyond the VM is refused the same way.
    let e = f.rt.update("fits", br#"{"memory": {"limit": 1073741824}}"#.to_vec()).await.expect_err("update");
    assert!(e.to_string().contains("1024 MiB"), "{e}");
    f.rt.update("fits", br#"{"memory": {"limit": 104857600}}"#.to_vec()).await.expect("update within");
    f.rt.delete("fits", true, VmProcess::default()).await.expect("delete member");
    f.rt.delete("pod2", true, held.vm).await.expect("delete sandbox");
    f.assert_gone("pod2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_deletes_of_one_container_both_succeed() {
    let f = Fixture::new("deletes");
    f.rt.create("c1", &f.bundle(json!({})), Fixture::opts()).await.expect("create");
    f.rt.start("c1").await.expect("start");
    let (a, b) = tokio::join!(
        f.rt.delete("c1", true, VmProcess::default()),
        f.rt.delete("c1", true, VmProcess::default())
    );
    a.expect("first delete");
    b.expect("second delete");
    assert_eq!(f.fake.world().power_offs, 1);
    f.assert_gone("c1");
}

/// A dead shim's `delete` of any member of a running pod kills the VM without a word to the
/// guest; each member then deletes as stopped, and the last takes the sandbox's files.
#[tokio::test]
async fn a_dead_shims_delete_kills_the_vm_first_and_asks_the_guest_nothing() {
    let f = Fixture::new("abandoned");
    let sb = sandbox_of("pod4");
    let member = member_of("pod4");
    f.rt.create("pod4", &f.bundle(sb), Fixture::opts()).await.expect("sandbox");
    f.rt.start("pod4").await.expect("start sandbox");
    f.rt.create("m1", &f.bundle(member), Fixture::opts()).await.expect("member");
    f.rt.start("m1").await.expect("start member");
    f.rt.delete_abandoned("m1").await.expect("delete member");
    {
        let w = f.fake.world();
        assert_eq!((w.kills, w.power_offs), (1, 0));
        assert!(
            w.removed.is_empty() && w.signals.is_empty(),
            "the guest was asked: {:?} {:?}",
            w.removed,
            w.signals
        );
    }
    assert!(!f.rt.state.container_dir("m1").exists());
    f.rt.delete_abandoned("pod4").await.expect("delete sandbox");
    assert_eq!(f.fake.world().kills, 1);
    f.assert_gone("pod4");
    // Again, for one already gone: as a retried delete.
    f.rt.delete_abandoned("pod4").await.expect("delete again");
}

#[tokio::test]
async fn a_vm_that_died_reads_as_stopped_and_deletes_cleanly() {
    let f = Fixture::new("crash");
    f.rt.create("c1", &f.bundle(json!({})), Fixture::opts()).await.expect("create");
    f.fake.world().running_vms.clear();
    assert_eq!(status(&f, "c1").await, Status::Stopped);
    f.rt.delete("c1", false, VmProcess::default()).await.expect("delete");
    assert!(!Path::new(&f.rt.state.container_dir("c1")).exists());
}

/// Records sandbox `sid` as on a network of two fake plugins, as `cni::attach` leaves it
/// (without the namespace, which needs root).
fn on_fake_network(f: &Fixture, plugins: &FakePlugins, sid: &str) {
    plugins.plugin("net-a", "exit 0");
    plugins.plugin("net-b", "exit 0");
    let att = Attachment {
        netns: f.rt.state.netns_path(sid),
        conflist: json!({"cniVersion": "1.0.0", "name": "fake", "plugins": [{"type": "net-a"}, {"type": "net-b"}]}),
        container_id: sid.into(),
        ifname: "eth0".into(),
        port_mappings: vec!["8080:80".parse().expect("port")],
        bin_dirs: vec![plugins.dir.clone()],
        result: Some(serde_json::from_str(RESULT).expect("result")),
    };
    std::fs::create_dir_all(f.rt.state.sandbox_dir(sid)).expect("mkdir");
    f.rt.state.write_cni(sid, &att).expect("record");
}

/// The CNI calls so far, as `<plugin> <command>`.
fn cni_calls(plugins: &FakePlugins) -> Vec<String> {
    plugins.calls().into_iter().map(|c| c.0.split(' ').take(2).collect::<Vec<_>>().join(" ")).collect()
}

#[tokio::test]
async fn the_network_goes_with_the_vm_del_in_reverse_with_adds_result() {
    let f = Fixture::new("cni-delete");
    let plugins = FakePlugins::new("lifecycle-delete");
    on_fake_network(&f, &plugins, "c1");
    let held = f.rt.create("c1", &f.bundle(json!({})), Fixture::opts()).await.expect("create").expect("held");
    f.rt.start("c1").await.expect("start");
    assert!(cni_calls(&plugins).is_empty());
    f.rt.delete("c1", true, held.vm).await.expect("delete");
    assert_eq!(cni_calls(&plugins), ["net-b DEL", "net-a DEL"]);
    let calls = plugins.calls();
    // The namespace was never made here: DEL goes without CNI_NETNS, as the spec allows.
    assert!(calls[0].0.contains("id=c1 netns=unset if=eth0"), "{calls:?}");
    assert_eq!(calls[0].1["prevResult"], serde_json::from_str::<serde_json::Value>(RESULT).expect("json"));
    assert_eq!(calls[0].1["name"], "fake");
    assert_eq!(f.fake.world().power_offs, 1);
    f.assert_gone("c1");
}

#[tokio::test]
async fn a_failed_create_takes_the_network_down() {
    for step in [Step::Boot, Step::CreateContainer] {
        let f = Fixture::new(&format!("cni-rollback-{step:?}"));
        let plugins = FakePlugins::new(&format!("lifecycle-rollback-{step:?}"));
        on_fake_network(&f, &plugins, "c1");
        f.fake.world().fail.insert(step);
        f.rt.create("c1", &f.bundle(json!({})), Fixture::opts()).await.expect_err("fails");
        assert_eq!(cni_calls(&plugins), ["net-b DEL", "net-a DEL"], "{step:?}");
        f.assert_gone("c1");
    }
}

#[tokio::test]
async fn a_network_no_container_holds_goes_with_a_forced_delete() {
    let f = Fixture::new("cni-orphan");
    let plugins = FakePlugins::new("lifecycle-orphan");
    // `husk run` was killed after ADD, before the create.
    on_fake_network(&f, &plugins, "run-0a1b");
    assert!(matches!(
        f.rt.delete("run-0a1b", false, VmProcess::default()).await,
        Err(RuntimeError::NotFound(_))
    ));
    assert!(cni_calls(&plugins).is_empty());
    f.rt.delete("run-0a1b", true, VmProcess::default()).await.expect("forced delete");
    assert_eq!(cni_calls(&plugins), ["net-b DEL", "net-a DEL"]);
    f.assert_gone("run-0a1b");
    // Killed after the VM booted, before the container was recorded: the VM goes too.
    let plugins = FakePlugins::new("lifecycle-orphan-vm");
    on_fake_network(&f, &plugins, "run-2c3d");
    let booted = f
        .fake
        .boot(
            &f.rt.state,
            "run-2c3d",
            &shape::vm_shape(&f.rt.cfg, &f.bundle(json!({})), &Fixture::opts()).expect("shape"),
        )
        .await
        .expect("boot");
    f.rt.state.write_sandbox(&booted.record).expect("record");
    // The killed `husk run`'s own files (its bundle, an unpacked image) go too.
    std::fs::create_dir_all(f.rt.state.run_dir("run-2c3d").join("rootfs/etc")).expect("run dir");
    f.rt.remove_orphan_sandbox("run-2c3d").await.expect("orphan");
    assert_eq!(f.fake.world().power_offs, 1);
    assert_eq!(cni_calls(&plugins), ["net-b DEL", "net-a DEL"]);
    f.assert_gone("run-2c3d");
    assert!(!f.rt.state.run_dir("run-2c3d").exists(), "the run's directory is left");
    // A sandbox that holds a container is no orphan.
    f.rt.create("c1", &f.bundle(json!({})), Fixture::opts()).await.expect("create");
    f.rt.remove_orphan_sandbox("c1").await.expect("not an orphan");
    assert!(f.rt.state.read_sandbox("c1").expect("read").is_some());
}

#[tokio::test]
async fn a_forced_delete_clears_what_a_create_killed_before_recording_left() {
    let f = Fixture::new("killed-create");
    // The create reserved the id and locked its sandbox, then died (its locks went with it).
    drop(f.rt.state.reserve_container("c1").expect("reserve"));
    drop(f.rt.state.lock_sandbox("c1").expect("sandbox dir"));
    assert!(matches!(f.rt.state.read_container("c1"), Err(RuntimeError::NotFound(_))));
    f.rt.delete("c1", true, VmProcess::default()).await.expect("forced delete");
    f.assert_gone("c1");
    // The id is free again.
    f.rt.create("c1", &f.bundle(json!({})), Fixture::opts()).await.expect("create");
}

#[tokio::test]
async fn a_failed_del_keeps_the_record_for_the_next_delete() {
    let f = Fixture::new("cni-del-fails");
    let plugins = FakePlugins::new("lifecycle-del-fails");
    on_fake_network(&f, &plugins, "c1");
    plugins.plugin("net-a", "echo '{\"code\": 999, \"msg\": \"iptables is locked\"}'; exit 1");
    let held = f.rt.create("c1", &f.bundle(json!({})), Fixture::opts()).await.expect("create").expect("held");
    let e = f.rt.delete("c1", true, held.vm).await.expect_err("DEL fails").to_string();
    assert!(e.contains("CNI plugin net-a (DEL) failed with code 999: iptables is locked"), "{e}");
    // The VM is off; the container (stopped) and the network's record stay for a retry.
    assert_eq!(f.fake.world().power_offs, 1);
    assert_eq!(status(&f, "c1").await, Status::Stopped);
    assert!(f.rt.state.read_cni("c1").expect("read").is_some());
    plugins.plugin("net-a", "exit 0");
    f.rt.delete("c1", true, VmProcess::default()).await.expect("delete again");
    assert_eq!(cni_calls(&plugins), ["net-b DEL", "net-a DEL", "net-b DEL", "net-a DEL"]);
    f.assert_gone("c1");
}

#[test]
fn vm_memory_follows_the_limit_but_not_past_the_host() {
    let f = Fixture::new("shape");
    let cfg = &f.rt.cfg;
    let shape = |limit: i64| {
        let b = f.bundle(json!({"linux": {"resources": {"memory": {"limit": limit}}}}));
        shape::vm_shape(cfg, &b, &Fixture::opts()).expect("shape").memory_mib
    };
    assert_eq!(shape(1 << 30), (1024 + 128).max(cfg.memory_mib));
    assert!(u64::from(shape(i64::MAX)) <= shape::host_memory_mib().max(cfg.memory_mib.into()));
}

#[test]
fn timestamps_look_like_rfc3339_and_exec_ids_are_valid() {
    let t = now_rfc3339();
    assert_eq!(t.len(), "2026-12-01T07:58:30.123456789Z".len(), "{t}");
    assert!(t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    let (a, b) = (exec::new_exec_id(), exec::new_exec_id());
    assert_ne!(a, b);
    assert!(crate::state::check_id(&a).is_ok(), "{a}");
}
