//! vsock end to end: husk-vmm with the hybrid vsock device, the test init's vsock mode in the
//! guest, and `husk-vsock-probe` on the host side, all in one test-host run.

use std::path::Path;
use std::time::Duration;

use husk_tests::artifacts::DeviceTestKit;
use husk_tests::{require, run_job, Job};

#[test]
fn vsock_streams_between_host_and_guest() {
    let kit = require!(DeviceTestKit::find());
    let (v, p, k, i) = (kit.vmm.display(), kit.probe.display(), kit.kernel.display(), kit.initrd.display());
    let script = format!(
        r#"
S=/tmp/vm.sock
{p} serve-echo ${{S}}_5000 &
{v} --kernel {k} --initramfs {i} --vcpus 2 --memory 256 --vsock $S \
    --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet husk.test=vsock" </dev/null >/tmp/vm.out 2>&1 &
vm=$!
timeout 600 {p} host-checks $S; echo "@@PROBE-RC $?"
timeout 60 sh -c "while kill -0 $vm 2>/dev/null; do sleep 0.2; done"
kill -0 $vm 2>/dev/null && {{ echo "@@VM-STILL-RUNNING"; kill -9 $vm; }}
wait $vm; echo "@@VM-RC $?"
cat /tmp/vm.out
ls $S 2>/dev/null && echo "@@SOCKET-LEFT"
"#
    );
    let mut job = Job::new(script).timeout(Duration::from_secs(1200));
    job.files.extend(kit.files().map(Path::to_path_buf));
    let out = run_job(&job).unwrap_or_else(|e| panic!("test host failed: {e}"));
    let o = &out.output;
    eprintln!("test host: {:?}\n{o}", out.elapsed);
    for check in [
        "guest-ready",
        "h2g-echo-64MiB",
        "h2g-32-concurrent",
        "h2g-refused",
        "h2g-kill-mid-stream",
        "h2g-close-both-ends",
    ] {
        assert!(o.contains(&format!("HOST-CHECK {check} ok")), "host check {check} failed:\n{o}");
    }
    for check in ["g2h-echo-4MiB", "g2h-32-concurrent", "g2h-refused"] {
        assert!(o.contains(&format!("GUEST-CHECK {check} ok")), "guest check {check} failed:\n{o}");
    }
    assert!(!o.contains("FAIL"), "{o}");
    assert!(o.contains("@@PROBE-RC 0"), "{o}");
    assert!(o.contains("@@VM-RC 0"), "the guest powers off cleanly after the checks:\n{o}");
    assert!(!o.contains("@@SOCKET-LEFT"), "the VMM removes its socket on exit:\n{o}");
}
