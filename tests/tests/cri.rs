//! Kubernetes pods through containerd 1.6's CRI plugin with a `husk` runtime handler (the runc
//! shim with `BinaryName` = husk), in one test-host boot. containerd keeps its own defaults
//! (root, state, socket, the runc shim's `--root`); a second handler has a state root of over
//! 80 characters. A CRI client on the k8s-cri crate (husk-cri-probe) runs each check as its own
//! pod, as kubelet would: the `FROM scratch` pause image, a read-only rootfs with a writable
//! volume, nginx-style logs through `/dev/stdout`, ExecSync with a timeout, Exec with a tty
//! and stdin over the streaming URL, a seccomp profile in the container and in an exec,
//! setuid with privilege escalation allowed and denied, `rshared` and `rslave` volumes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_tests::artifacts::{bin, guest_bin, RuntimeTestKit};
use husk_tests::{require, run_job, Job};

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
cat > /etc/containerd/config.toml <<EOC
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "husk.test/pause:1"
  # This sandbox lacks CAP_SYS_RESOURCE (see shared/kvm-on-this-machine.md).
  restrict_oom_score_adj = true
  # Naming runtimes replaces containerd's built-in table, so its default comes back too.
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk.options]
      BinaryName = "@HUSK@"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim]
    runtime_type = "io.containerd.husk.v2"
  # husk's config file from the runtime options: a bigger VM; and one that does not exist.
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim-cfg]
    runtime_type = "io.containerd.husk.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim-cfg.options]
      ConfigPath = "/etc/husk/pod-512.json"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim-badcfg]
    runtime_type = "io.containerd.husk.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim-badcfg.options]
      ConfigPath = "/nonexistent/husk.json"
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
( while sleep 120; do echo "@@WATCH"; ps -o pid,ppid,stat,args | grep -v '\[' | cut -c1-160; done ) & watch=$!
echo "=== runc shim with husk"
@PROBE@ run /run/containerd/containerd.sock husk husk-long
echo "=== husk shim"
@PROBE@ run /run/containerd/containerd.sock husk-shim husk-shim
kill $watch
echo "--- containerd log (errors)"; grep -iE 'level=(error|warning)|failed' /var/containerd.log | tail -n 30 | cut -c1-600
kill $ctrd; wait $ctrd
ps -o pid,args | grep -v grep | grep -q 'husk-vmm' && { echo "@@LEFT-VMM"; ps -o pid,args | grep husk-vmm; }
grep -E ' /run/containerd/(runc|husk-long-root)' /proc/mounts && echo "@@LEFT-MOUNT"
ps -o pid,args | grep -v grep | grep -q 'containerd-shim-husk' && { echo "@@LEFT-SHIM"; ps -o pid,args | grep containerd-shim-husk; }
for d in /run/containerd/runc/k8s.io @LONGROOT@ /run/husk/containerd/k8s.io; do
    find $d/containers $d/sandboxes -mindepth 1 2>/dev/null | grep -q . && { echo "@@LEFT-STATE $d"; find $d | head; }
done
echo "@@CLEAN-CHECKED"
"##;

#[test]
fn kubernetes_pods_through_containerd_cri() {
    let kit = require!(RuntimeTestKit::find());
    let probe = require!(bin("husk-cri-probe"));
    let pause = require!(guest_bin("husk-pause"));
    let d = |p: &Path| p.display().to_string();
    let script = SCRIPT
        .replace("@HUSK@", &d(&kit.husk))
        .replace("@PROBE@", &d(&probe))
        .replace("@PAUSE@", &d(&pause))
        .replace("@BUSYBOX@", &d(&kit.busybox))
        .replace("@LONGROOT@", LONG_ROOT)
        .replace("@BINDIR@", &d(kit.shim.parent().unwrap_or(Path::new("/"))));
    assert!(LONG_ROOT.len() >= 80);
    let mut job = Job::new(script).timeout(Duration::from_secs(1800));
    job.files.extend(kit.files().map(Path::to_path_buf));
    job.files.extend([probe, pause, PathBuf::from("/usr/bin/mount")]);
    // One L1 CPU, as in the runtime test (the nested test host is steadier with one).
    job.cpus = 1;
    job.mem_mib = 3072;
    // Its watchdog prints every 120 s: silence for longer is a stalled L1, run once more.
    job.stall_after = Some(Duration::from_secs(420));
    let out = run_job(&job).unwrap_or_else(|e| panic!("test host failed: {e}"));
    let o = &out.output;
    eprintln!("test host: {:?}\n{o}", out.elapsed);
    for bad in ["@@NO-CGROUP2", "@@NO-RSHARED", "@@PROBE-ERROR", "@@LEFT-"] {
        assert!(!o.contains(bad), "{bad}:\n{o}");
    }
    let failed: Vec<&str> = o.lines().filter(|l| l.starts_with("@@") && l.contains(" FAIL ")).collect();
    assert!(failed.is_empty(), "CRI checks failed:\n{}\n\n{o}", failed.join("\n"));
    for check in ["@@CONTAINERD-UP", "@@IMAGES-WRITTEN", "@@IMAGES-IMPORTED", "@@CLEAN-CHECKED"] {
        assert!(o.contains(check), "expected {check}:\n{o}");
    }
    // The same checks through the runc shim with husk as its binary, then through husk's shim.
    let runc_shim = section(o, "=== runc shim with husk", "=== husk shim");
    let husk_shim = section(o, "=== husk shim", "--- containerd log");
    for (part, text) in [("runc shim", runc_shim), ("husk shim", husk_shim)] {
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
            "@@PROBE-DONE",
        ] {
            assert!(text.contains(check), "{part}: expected {check}:\n{o}");
        }
    }
    for check in ["@@SHIM-PER-POD ok", "@@SHIM-KILLED ok", "@@SHIM-OPTIONS ok"] {
        assert!(husk_shim.contains(check), "husk shim: expected {check}:\n{o}");
    }
}

fn section<'a>(o: &'a str, start: &str, end: &str) -> &'a str {
    let from = o.find(start).unwrap_or(o.len());
    let to = o[from..].find(end).map(|i| from + i).unwrap_or(o.len());
    &o[from..to]
}
