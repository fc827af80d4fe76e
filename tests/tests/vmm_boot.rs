//! husk-vmm boots the guest kernel under real KVM (directly, or in the nested test host): one
//! test-host run batches every boot case, since each L1 boot costs seconds.

use std::collections::BTreeMap;
use std::time::Duration;

use husk_tests::artifacts::{bin, guest_artifact};
use husk_tests::{require, run_job, unavailable_reason, Job};

const MARKER: &str = "HUSK-TEST-INIT-READY";
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

/// Output and status of each `case NAME` in the job's output.
fn parse_cases(output: &str) -> BTreeMap<String, (String, i32)> {
    let mut cases = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("@@CASE ") {
            current = Some((name.trim().to_string(), String::new()));
        } else if let Some(rest) = line.strip_prefix("@@RC ") {
            let mut it = rest.split_whitespace();
            let (name, rc) = (it.next().unwrap_or(""), it.next().and_then(|r| r.parse().ok()).unwrap_or(-1));
            if let Some((n, out)) = current.take() {
                assert_eq!(n, name, "case markers out of order");
                cases.insert(n, (out, rc));
            }
        } else if let Some((_, out)) = current.as_mut() {
            out.push_str(line);
            out.push('\n');
        }
    }
    cases
}

#[test]
fn vmm_boots_guest_kernel_cases() {
    require!(unavailable_reason().map_or(Ok(()), Err));
    let vmm = require!(bin("husk-vmm"));
    let kernel = require!(guest_artifact("vmlinux"));
    let bzimage = require!(guest_artifact("bzImage"));
    let initrd = require!(guest_artifact("test-init.cpio"));
    let (v, k, b, i) = (vmm.display(), kernel.display(), bzimage.display(), initrd.display());
    let json = format!(
        r#"{{"kernel": "{k}", "initramfs": "{i}", "cmdline": "{BASE_CMDLINE} husk.test=poweroff", "memory_mib": 96, "vcpus": 1, "serial": "stdio", "rng": false}}"#
    );
    let script = format!(
        r#"
V={v}; K={k}; B={b}; I={i}; base="{BASE_CMDLINE}"
run() {{ name=$1; shift; echo "@@CASE $name"; timeout 120 "$@" 2>&1 </dev/null; echo "@@RC $name $?"; }}
run poweroff $V --kernel $K --initramfs $I --cmdline "$base husk.test=poweroff"
run panic $V --kernel $K --initramfs $I --cmdline "$base husk.test=panic"
run reboot $V --kernel $K --initramfs $I --cmdline "$base husk.test=reboot"
run smp2 $V --kernel $K --initramfs $I --vcpus 2 --memory 256 --cmdline "$base husk.test=poweroff"
run bzimage $V --kernel $B --initramfs $I --cmdline "$base husk.test=poweroff"
echo '{json}' > /tmp/vm.json
run json $V --config /tmp/vm.json
run serialfile $V --kernel $K --initramfs $I --serial file:/tmp/console.log --cmdline "$base husk.test=poweroff"
echo "@@CASE serialfile-content"; cat /tmp/console.log; echo "@@RC serialfile-content 0"
"#
    );
    let job = Job::new(script)
        .timeout(Duration::from_secs(900))
        .file(&vmm)
        .file(&kernel)
        .file(&bzimage)
        .file(&initrd);
    let out = run_job(&job).unwrap_or_else(|e| panic!("test host failed: {e}"));
    eprintln!("test host: {:?}, {:?}\n{}", out.elapsed, out.l1, out.output);
    let cases = parse_cases(&out.output);
    let case = |name: &str| cases.get(name).unwrap_or_else(|| panic!("case {name} missing:\n{}", out.output));

    let (o, rc) = case("poweroff");
    assert_eq!(*rc, 0, "poweroff exits 0:\n{o}");
    assert!(o.contains(MARKER) && o.contains("action=poweroff"), "{o}");
    assert!(o.contains("cpus=1"), "{o}");
    assert!(o.contains("rng=virtio_rng"), "virtio-rng is the guest's hwrng:\n{o}");

    let (o, rc) = case("panic");
    assert_eq!(*rc, 2, "a guest panic exits 2:\n{o}");
    assert!(o.contains(MARKER) && o.contains("guest kernel panicked"), "{o}");

    let (o, rc) = case("reboot");
    assert_eq!(*rc, 4, "a guest reset exits 4:\n{o}");
    assert!(o.contains("guest requested a reset"), "{o}");

    let (o, rc) = case("smp2");
    assert_eq!(*rc, 0, "{o}");
    assert!(o.contains("cpus=2"), "guest sees both vCPUs:\n{o}");

    let (o, rc) = case("bzimage");
    assert_eq!(*rc, 0, "{o}");
    assert!(o.contains(MARKER), "bzImage boots through the Linux boot protocol:\n{o}");

    let (o, rc) = case("json");
    assert_eq!(*rc, 0, "{o}");
    assert!(o.contains(MARKER) && o.contains("rng=none"), "JSON config (rng off) boots:\n{o}");

    let (o, rc) = case("serialfile");
    assert_eq!(*rc, 0, "{o}");
    assert!(!o.contains(MARKER), "console goes to the file, not stdout:\n{o}");
    let (o, _) = case("serialfile-content");
    assert!(o.contains(MARKER), "{o}");
}
