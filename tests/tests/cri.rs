//! Kubernetes pods through containerd 1.6's CRI plugin with a `husk` runtime handler (the runc
//! shim with `BinaryName` = husk, and husk's own shim), one test-host boot per shim. containerd keeps its own defaults
//! (root, state, socket, the runc shim's `--root`); a second handler has a state root of over
//! 80 characters. A CRI client on the k8s-cri crate (husk-cri-probe) runs each check as its own
//! pod, as kubelet would: the `FROM scratch` pause image, a read-only rootfs with a writable
//! volume, nginx-style logs through `/dev/stdout`, ExecSync with a timeout, Exec with a tty
//! and stdin over the streaming URL, a seccomp profile in the container and in an exec,
//! setuid with privilege escalation allowed and denied, `rshared` and `rslave` volumes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_tests::artifacts::{bin, guest_bin, RuntimeTestKit};
use husk_tests::{run_job, Job};

const LONG_ROOT: &str = "/run/containerd/husk-long-root/a-state-root-of-more-than-eighty-characters/k8s.io";

const SCRIPT: &str = r##"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
until_ok() { t=$1; shift; i=0; while ! "$@" >/dev/null 2>&1; do i=$((i+1)); [ $i -ge $((t*5)) ] && return 1; sleep 0.2; done; }
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "@@NO-CGROUP2"
# As on a systemd node: volumes with bidirectional propagation need a shared host mount.
mount --make-rshared / || echo "@@NO-RSHARED"
mkdir -p /var/lib/containerd /etc/containerd /var/cri /etc/husk
echo '{"memory_mib": 512}' > /etc/husk/pod-512.json
# What a node has and host-network pods are given copies of.
echo '127.0.0.1 localhost' > /etc/hosts; echo 'nameserver 127.0.0.53' > /etc/resolv.conf; hostname node
mount -t tmpfs tmpfs /var/lib/containerd
echo '{"kernel": "/nonexistent/vmlinux"}' > /etc/husk/no-kernel.json
# Pod networks from CNI: a bridge on a private subnet with the node as its gateway
# (10.213.7.1) and no masquerade: L1 has no other interface, so nothing is routed anywhere else.
mkdir -p /etc/cni/net.d
cat > /etc/cni/net.d/10-husk-test.conflist <<EON
{"cniVersion": "1.0.0", "name": "husk-test", "plugins": [
  {"type": "bridge", "bridge": "husk-test0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.213.7.0/24", "gateway": "10.213.7.1"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EON
cat > /etc/containerd/config.toml <<EOC
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "husk.test/pause:1"
  # This sandbox lacks CAP_SYS_RESOURCE (see shared/kvm-on-this-machine.md).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
  # Naming runtimes replaces containerd's built-in table, so its default comes back too.
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
    runtime_type = "io.containerd.runc.v2"
    # husk's VM size annotations reach the pod's spec.
    pod_annotations = ["io.husk.vm.*"]
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk.options]
      BinaryName = "@HUSK@"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim]
    runtime_type = "io.containerd.husk.v2"
    pod_annotations = ["io.husk.vm.*"]
  # husk's config file from the runtime options: a bigger VM; and one that does not exist.
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim-cfg]
    runtime_type = "io.containerd.husk.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim-cfg.options]
      ConfigPath = "/etc/husk/pod-512.json"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim-badcfg]
    runtime_type = "io.containerd.husk.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim-badcfg.options]
      ConfigPath = "/nonexistent/husk.json"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim-nokernel]
    runtime_type = "io.containerd.husk.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim-nokernel.options]
      ConfigPath = "/etc/husk/no-kernel.json"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-long]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-long.options]
      BinaryName = "@HUSK@"
      Root = "@LONGROOT@"
EOC
# containerd finds containerd-shim-husk-v2 on its PATH.
PATH=$PATH:@BINDIR@ containerd >/var/containerd.log 2>&1 &
ctrd=$!
until_ok 60 ctr version && echo "@@CONTAINERD-UP"
@PROBE@ images /var/cri/img @PAUSE@ @BUSYBOX@
ctr -n k8s.io images import /var/cri/img/pause.tar >/dev/null && ctr -n k8s.io images import /var/cri/img/bb.tar >/dev/null \
    && echo "@@IMAGES-IMPORTED"
# If a step stalls, the process list says where: on L1's console, whose tail a timeout reports
# (in the output it could land inside a section that a check reads whole).
( while sleep 120; do { echo "@@WATCH"; ps -o pid,ppid,stat,args | grep -v '\[' | cut -c1-160; } >/dev/console; done ) & watch=$!
echo "=== @PART@"
@PROBE@ run /run/containerd/containerd.sock @HANDLERS@
kill $watch
# Which VM shapes the pods had snapshots made for, and how long each took.
echo "--- snapshots"; @HUSK@ snapshot ls
echo "--- containerd log (errors)"; grep -iE 'level=(error|warning)|failed' /var/containerd.log | tail -n 30 | cut -c1-600
kill $ctrd; wait $ctrd
ps -o pid,args | grep -v grep | grep -q 'husk-vmm' && { echo "@@LEFT-VMM"; ps -o pid,args | grep husk-vmm; }
grep -E ' /run/containerd/(runc|husk-long-root)' /proc/mounts && echo "@@LEFT-MOUNT"
ps -o pid,args | grep -v grep | grep -q 'containerd-shim-husk' && { echo "@@LEFT-SHIM"; ps -o pid,args | grep containerd-shim-husk; }
for d in /run/containerd/runc/k8s.io @LONGROOT@ /run/husk/containerd/k8s.io; do
    find $d/containers $d/sandboxes -mindepth 1 2>/dev/null | grep -q . && { echo "@@LEFT-STATE $d"; find $d | head; }
done
# CNI DEL ran for every pod: no veth, no pod netns, no address still leased.
ls /sys/class/net | grep -q '^veth' && { echo "@@LEFT-VETH"; ls /sys/class/net; }
ls /var/run/netns 2>/dev/null | grep -q . && { echo "@@LEFT-NETNS"; ls /var/run/netns; }
ls /var/lib/cni/networks/husk-test 2>/dev/null | grep -q '^10\.' && { echo "@@LEFT-LEASE"; ls /var/lib/cni/networks/husk-test; }
# portmap's per-pod chains went with CNI DEL.
iptables-save -t nat | grep -q 'CNI-DN-' && { echo "@@LEFT-PORTMAP"; iptables-save -t nat; }
echo "@@CLEAN-CHECKED"
"##;

/// One test-host boot per shim: each is a few minutes, so a stalled L1 (see `Job::stall_after`)
/// costs one part's rerun, not the whole suite's.
fn run_part(part: &str, handlers: &str) -> Option<String> {
    let kit = RuntimeTestKit::find();
    let (kit, probe, pause) = match (kit, bin("husk-cri-probe"), guest_bin("husk-pause")) {
        (Ok(k), Ok(p), Ok(q)) => (k, p, q),
        (k, p, q) => {
            let reason = [k.err(), p.err(), q.err()].into_iter().flatten().collect::<Vec<_>>().join("; ");
            assert!(!husk_tests::artifacts::strict(), "prerequisite missing in strict mode: {reason}");
            eprintln!("skipped: {reason}");
            return None;
        }
    };
    let d = |p: &Path| p.display().to_string();
    let script = SCRIPT
        .replace("@HUSK@", &d(&kit.husk))
        .replace("@PROBE@", &d(&probe))
        .replace("@PAUSE@", &d(&pause))
        .replace("@BUSYBOX@", &d(&kit.busybox))
        .replace("@LONGROOT@", LONG_ROOT)
        .replace("@PART@", part)
        .replace("@HANDLERS@", handlers)
        .replace("@BINDIR@", &d(kit.shim.parent().unwrap_or(Path::new("/"))));
    assert!(LONG_ROOT.len() >= 80);
    let mut job = Job::new(script).timeout(Duration::from_secs(1200));
    job.files.extend(kit.files().map(Path::to_path_buf));
    job.files.extend([probe, pause, PathBuf::from("/usr/bin/mount")]);
    // CNI: the plugins containerd runs for each pod (loopback always, portmap for hostPort), and
    // iptables for portmap's NAT rules and husk's loopback redirect in each pod namespace.
    match husk_tests::artifacts::cni_files() {
        Ok(files) => job.files.extend(files),
        Err(reason) => {
            assert!(!husk_tests::artifacts::strict(), "prerequisite missing in strict mode: {reason}");
            eprintln!("skipped: {reason}");
            return None;
        }
    }
    job.net = true;
    // One L1 CPU, as in the runtime test (the nested test host is steadier with one).
    job.cpus = 1;
    job.mem_mib = 3072;
    // Its watchdog prints every 120 s: silence for longer is a stalled L1, run once more.
    job.stall_after = Some(Duration::from_secs(300));
    let out = run_job(&job).unwrap_or_else(|e| panic!("test host failed: {e}"));
    let o = out.output;
    eprintln!("test host: {:?}\n{o}", out.elapsed);
    for bad in ["@@NO-CGROUP2", "@@NO-RSHARED", "@@PROBE-ERROR", "@@LEFT-"] {
        assert!(!o.contains(bad), "{bad}:\n{o}");
    }
    let failed: Vec<&str> = o.lines().filter(|l| l.starts_with("@@") && l.contains(" FAIL ")).collect();
    assert!(failed.is_empty(), "CRI checks failed:\n{}\n\n{o}", failed.join("\n"));
    for check in ["@@CONTAINERD-UP", "@@IMAGES-WRITTEN", "@@IMAGES-IMPORTED", "@@CLEAN-CHECKED"] {
        assert!(o.contains(check), "expected {check}:\n{o}");
    }
    for check in [
        "@@PAUSE-POD ok",
        "@@READONLY ok",
        "@@NGINX-STDIO ok",
        "@@EXECSYNC-TIMEOUT ok",
        "@@EXEC-TTY ok",
        "@@NGINX-LOGS ok",
        "@@SECCOMP ok",
        "@@SETUID ok",
        "@@PROPAGATION ok",
        "@@PID-MODES ok",
        "@@VM-SIZE ok",
        "@@POD-NET ok",
        "@@PORTS ok",
        "@@PROBE-DONE",
    ] {
        assert!(o.contains(check), "{part}: expected {check}:\n{o}");
    }
    Some(o)
}

/// The checks through the runc shim with husk as its binary (today's path).
#[test]
fn kubernetes_pods_through_containerd_cri_and_the_runc_shim() {
    run_part("runc shim with husk", "husk husk-long");
}

/// The same checks through husk's own shim, and the shim's own: one shim per pod, a killed
/// shim, runtime options.
#[test]
fn kubernetes_pods_through_containerd_cri_and_the_husk_shim() {
    let Some(o) = run_part("husk shim", "husk-shim husk-shim") else { return };
    for check in ["@@SHIM-PER-POD ok", "@@SHIM-KILLED ok", "@@SHIM-OPTIONS ok"] {
        assert!(o.contains(check), "husk shim: expected {check}:\n{o}");
    }
}
