//! husk-agent end to end, in one test-host boot:
//! 1. host mode: the static agent serving on a Unix socket, running containers on the test host
//!    itself (in a private mount namespace with cgroup v2), driven by `husk-agent-probe`;
//! 2. VM mode: husk-vmm booting the agent as PID 1, the busybox rootfs on a read-only virtio-fs
//!    share (so writable containers get an overlay), the probe dialling through hybrid vsock,
//!    and DestroySandbox powering the VM off.

use std::path::Path;
use std::time::Duration;

use husk_tests::artifacts::AgentTestKit;
use husk_tests::{require, run_job, Job};

const SCRIPT: &str = r#"
mk_rootfs() {
    mkdir -p $1/bin $1/proc $1/sys $1/dev $1/tmp $1/etc
    cp @BUSYBOX@ $1/bin/busybox
    # Relative links: the rootfs is seen from inside the container.
    for a in $($1/bin/busybox --list); do [ $a = busybox ] || ln -sf busybox $1/bin/$a; done
}

echo "=== host mode"
mk_rootfs /var/hm/shares/bb/rootfs
unshare -m --propagation private sh -c '
    mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "@@NO-CGROUP2"
    mount -t tmpfs tmpfs /run
    @AGENT@ serve --unix /var/hm/agent.sock --shares /var/hm/shares --state /run/husk-agent 2>/var/hm/agent.log &
    a=$!
    timeout 900 @PROBE@ checks /var/hm/agent.sock bb rootfs --destroy; echo "@@HOST-PROBE-RC $?"
    timeout 30 sh -c "while kill -0 $a 2>/dev/null; do sleep 0.1; done"
    wait $a; echo "@@HOST-AGENT-RC $?"
    ls -d /sys/fs/cgroup/husk/*/ 2>/dev/null && echo "@@HOST-CGROUPS-LEFT"
    ls /run/husk-agent/containers /run/husk-agent/bundles /run/husk-agent/overlays | grep -v : | grep . && echo "@@HOST-STATE-LEFT"
    grep husk-agent /proc/mounts && echo "@@HOST-MOUNTS-LEFT"
    tail -n 20 /var/hm/agent.log
'

echo "=== VM mode"
S=/var/vm/share
mk_rootfs $S/rootfs
@VMM@ --kernel @KERNEL@ --initramfs @INITRD@ --memory 512 --vcpus 1 --vsock /var/vm/vsock.sock \
    --fs tag=bb,path=$S,ro --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet" </dev/null >/var/vm/vm.out 2>&1 &
vm=$!
# If a run stalls, show who is burning L1's CPU (per husk-vmm thread: comm, utime, stime).
( while sleep 90; do
    echo "@@MON $(cut -d' ' -f1 /proc/uptime)"; top -b -n 1 | head -n 12
    for t in /proc/$vm/task/*; do echo "  $(cat $t/comm) $(cut -d' ' -f14,15 $t/stat)"; done
  done ) &
mon=$!
timeout 600 @PROBE@ checks /var/vm/vsock.sock bb rootfs --read-only-share --destroy --vm; echo "@@VM-PROBE-RC $?"
timeout 60 sh -c "while kill -0 $vm 2>/dev/null; do sleep 0.2; done"
kill -0 $vm 2>/dev/null && { echo "@@VM-STILL-RUNNING"; kill -9 $vm; }
wait $vm; echo "@@VM-RC $?"
kill $mon
tail -n 60 /var/vm/vm.out
ls /var/vm/vsock.sock 2>/dev/null && echo "@@SOCKET-LEFT"
"#;

/// Every check the probe runs; each must report ok in both modes.
const CHECKS: [&str; 16] = [
    "prepare-snapshot",
    "echo",
    "exit-code-3",
    "killed-by-signal-9",
    "pid-namespace-pid-1",
    "hostname",
    "readonly-rootfs-refuses-writes",
    "stdin-closed-eof",
    "close-stdin-rpc-eof",
    "oom-kill-event",
    "exec-ps-stats-pause-resume-signal",
    "tty-with-resize",
    "bad-requests-refused",
    "still-serving-nothing-left",
    "destroy-sandbox",
    "writable-rootfs",
];

fn section<'a>(o: &'a str, start: &str, end: Option<&str>) -> &'a str {
    let from = o.find(start).unwrap_or(o.len());
    let to = end.and_then(|e| o[from..].find(e).map(|i| from + i)).unwrap_or(o.len());
    &o[from..to]
}

#[test]
fn agent_runs_containers_on_the_host_and_in_a_vm() {
    let kit = require!(AgentTestKit::find());
    let d = |p: &Path| p.display().to_string();
    let script = SCRIPT
        .replace("@BUSYBOX@", &d(&kit.busybox))
        .replace("@AGENT@", &d(&kit.agent))
        .replace("@PROBE@", &d(&kit.probe))
        .replace("@VMM@", &d(&kit.vmm))
        .replace("@KERNEL@", &d(&kit.kernel))
        .replace("@INITRD@", &d(&kit.initrd));
    let mut job = Job::new(script).timeout(Duration::from_secs(2400));
    job.files.extend(kit.files().map(Path::to_path_buf));
    // One guest vCPU on one L1 CPU, as in the runtime and CRI tests. With two L1 CPUs the
    // guest kernel hung or triple-faulted right after PCI init in 2 of 6 runs on one day
    // (QEMU's MTTCG with nested SVM is the suspect); 2-vCPU guests had stalled a one-CPU L1
    // before, so the guest stays at one vCPU. The boot and device tests cover SMP guests.
    job.cpus = 1;
    let out = run_job(&job).unwrap_or_else(|e| panic!("test host failed: {e}"));
    let o = &out.output;
    eprintln!("test host: {:?}\n{o}", out.elapsed);

    let host = section(o, "=== host mode", Some("=== VM mode"));
    let vm = section(o, "=== VM mode", None);
    for (mode, text) in [("host", host), ("vm", vm)] {
        for check in CHECKS {
            let check = match (mode, check) {
                ("vm", "writable-rootfs") => "writable-rootfs-overlay-on-ro-share",
                (_, c) => c,
            };
            assert!(
                text.contains(&format!("CHECK {check} ok")),
                "{mode} mode: check {check} failed:\n{text}"
            );
        }
        assert!(text.contains("PROBE-FAILURES 0"), "{mode} mode:\n{text}");
    }
    assert!(!host.contains("@@NO-CGROUP2"), "{host}");
    assert!(host.contains("@@HOST-PROBE-RC 0"), "{host}");
    assert!(host.contains("@@HOST-AGENT-RC 0"), "DestroySandbox ends host mode cleanly:\n{host}");
    for left in ["@@HOST-CGROUPS-LEFT", "@@HOST-STATE-LEFT", "@@HOST-MOUNTS-LEFT"] {
        assert!(!host.contains(left), "nothing is left after removal ({left}):\n{host}");
    }
    assert!(vm.contains("@@VM-PROBE-RC 0"), "{vm}");
    assert!(vm.contains("@@VM-RC 0"), "DestroySandbox powers the VM off and husk-vmm exits 0:\n{vm}");
    assert!(!vm.contains("@@SOCKET-LEFT"), "{vm}");
}
