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
    let ctl = require!(bin("husk-vmm-ctl"));
    let (v, k, b, i) = (vmm.display(), kernel.display(), bzimage.display(), initrd.display());
    let c = ctl.display();
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
{SNAPSHOT_SCRIPT}"#
    );
    let script = script.replace("$C", &c.to_string());
    let job = Job::new(script)
        .timeout(Duration::from_secs(900))
        .file(&ctl)
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

    check_snapshot_cases(&cases);
}

/// Boot the test init, snapshot it at its ready line, restore it twice (one after the other)
/// in new husk-vmms and talk to each; then show that a damaged or foreign snapshot is refused.
/// Numbers go to the output.
const SNAPSHOT_SCRIPT: &str = r#"
now() { cut -d' ' -f1 /proc/uptime; }
ms() { awk "BEGIN { print int(($2 - $1) * 1000) }"; }
waitfor() { i=0; while ! grep -q "$1" "$2" && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; }
snapvm="--kernel $K --initramfs $I --memory 256 --image-id test-init"
mkdir -p /tmp/snap /tmp/share-base /tmp/share-restored
echo "@@CASE snapshot"
t0=$(now)
$V $snapvm --vsock /tmp/vs-base.sock --fs tag=share,path=/tmp/share-base --cmdline "$base husk.test=snapshot" \
  --control /tmp/ctl.sock --snapshot-dir /tmp/snap </dev/null >/tmp/base.log 2>&1 &
bpid=$!
waitfor HUSK-SNAPSHOT-READY /tmp/base.log
echo "cold_boot_ms=$(ms $t0 $(now))"
$C /tmp/ctl.sock ping
t0=$(now)
$C /tmp/ctl.sock snapshot
echo "snapshot_rc=$? snapshot_ms=$(ms $t0 $(now))"
wait $bpid; echo "base_rc=$?"
cat /tmp/base.log
echo "memory_file_kib=$(du -k /tmp/snap/memory | cut -f1) state_bytes=$(wc -c </tmp/snap/state)"
echo "@@RC snapshot 0"
restore_vm() {
mkfifo /tmp/in-$1
t0=$(now)
$V $snapvm --timings --vsock /tmp/vs-$1.sock --fs tag=share,path=/tmp/share-restored --restore /tmp/snap \
  </tmp/in-$1 >/tmp/$1.log 2>&1 &
rpid=$!
exec 3>/tmp/in-$1
echo go >&3
waitfor "got=go" /tmp/$1.log
echo "restore_ms=$(ms $t0 $(now))"
echo "restored_rss_kib=$(awk '/VmRSS/ { print $2 }' /proc/$rpid/status)"
[ -S /tmp/vs-$1.sock ] && echo "restored_vsock_socket=1"
echo check >&3
waitfor "got=check" /tmp/$1.log
echo bye >&3
exec 3>&-
wait $rpid; echo "restored_rc=$?"
cat /tmp/$1.log
}
echo "@@CASE restore"; restore_vm restored; echo "@@RC restore 0"
echo "@@CASE restore2"; restore_vm restored2; echo "@@RC restore2 0"
devs="--vsock /tmp/vs-x.sock --fs tag=share,path=/tmp/share-restored"
run foreign-memory $V --kernel $K --initramfs $I --memory 128 --image-id test-init $devs --restore /tmp/snap
run foreign-kernel $V --kernel $B --initramfs $I --memory 256 --image-id test-init $devs --restore /tmp/snap
run foreign-devices $V $snapvm --vsock /tmp/vs-x.sock --fs tag=other,path=/tmp/share-restored --restore /tmp/snap
head -c 3000 /tmp/snap/state > /tmp/state.cut && cp /tmp/state.cut /tmp/snap/state
run truncated-state $V $snapvm $devs --restore /tmp/snap
"#;

/// A restored VM's generation id (its `husk-vmm-genid:` line) and the random bytes its guest
/// drew after being told of it; its kernel must have reseeded for the fork exactly once.
fn sibling_generation(name: &str, r: &str) -> (String, String) {
    let ids: Vec<&str> = r.lines().filter_map(|l| l.strip_prefix("husk-vmm-genid: ")).collect();
    assert!(
        ids.len() == 1 && ids[0].len() == 32 && ids[0].bytes().all(|b| b.is_ascii_hexdigit()),
        "{name}: one husk-vmm-genid line with 32 hex digits:\n{r}"
    );
    let check =
        r.lines().find(|l| l.contains("got=check")).unwrap_or_else(|| panic!("{name}: no check reply:\n{r}"));
    assert_eq!(
        value(check, "vm_forks"),
        1,
        "{name}: the guest logs 'crng reseeded due to virtual machine fork':\n{r}"
    );
    let random = check
        .split_whitespace()
        .find_map(|w| w.strip_prefix("random="))
        .unwrap_or_else(|| panic!("{name}: no random bytes:\n{r}"));
    (ids[0].to_string(), random.to_string())
}

fn value(o: &str, key: &str) -> u64 {
    let pat = format!("{key}=");
    o.split_whitespace()
        .find_map(|w| w.strip_prefix(&pat))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} missing:\n{o}"))
}

fn check_snapshot_cases(cases: &BTreeMap<String, (String, i32)>) {
    let case = |name: &str| cases.get(name).unwrap_or_else(|| panic!("case {name} missing: {cases:?}"));
    let (o, _) = case("snapshot");
    assert_eq!(value(o, "snapshot_rc"), 0, "snapshot command answered ok:\n{o}");
    assert_eq!(value(o, "base_rc"), 0, "the snapshotted VMM exits 0:\n{o}");
    let token = o
        .split_whitespace()
        .find_map(|w| w.strip_prefix("token="))
        .unwrap_or_else(|| panic!("no ready line:\n{o}"))
        .to_string();
    let cold = value(o, "cold_boot_ms");
    let mut siblings = Vec::new();
    for name in ["restore", "restore2"] {
        let (r, _) = case(name);
        assert_eq!(value(r, "restored_rc"), 0, "{name}: the restored guest powers off cleanly:\n{r}");
        assert!(
            r.contains(&format!("HUSK-SNAPSHOT-ECHO token={token} got=go")),
            "{name}: the restored guest runs on with the snapshot's memory (token {token}):\n{r}"
        );
        assert!(r.contains("got=bye"), "{r}");
        assert_eq!(
            value(r, "restored_vsock_socket"),
            1,
            "the restored VM's vsock serves its own socket:\n{r}"
        );
        siblings.push(sibling_generation(name, r));
    }
    let (a, b) = (&siblings[0], &siblings[1]);
    assert_ne!(a.0, b.0, "each restore gets its own VM generation id");
    assert_ne!(a.1, b.1, "restored siblings' RNGs differ after the VMGenID reseed");
    eprintln!(
        "snapshot: restored generation ids {} and {}, guest random bytes {} and {}",
        a.0, b.0, a.1, b.1
    );
    let (r, _) = case("restore");
    let restore = value(r, "restore_ms");
    let rss = value(r, "restored_rss_kib");
    eprintln!(
        "snapshot: cold boot {cold} ms, restore {restore} ms ({:.2} of cold boot), snapshot {} ms, \
         restored RSS {rss} KiB of 262144 KiB guest memory, memory file {} KiB on disk",
        restore as f64 / cold as f64,
        value(o, "snapshot_ms"),
        value(o, "memory_file_kib"),
    );
    assert!(restore * 2 < cold, "restore ({restore} ms) should take well under cold boot ({cold} ms)");
    assert!(rss < 256 * 1024 / 4, "restored RSS {rss} KiB: the memory file should be mapped, not read");
    for (name, needle) in [
        ("foreign-memory", "snapshot was made for a different VM: memory: snapshot has 256 MiB"),
        ("foreign-kernel", "another kernel"),
        ("foreign-devices", "snapshot was made for a different VM: virtio device 1: snapshot has type 26"),
        ("truncated-state", "snapshot is truncated"),
    ] {
        let (o, rc) = case(name);
        assert_eq!(*rc, 1, "{name} is refused:\n{o}");
        assert!(o.contains(needle) && o.lines().count() == 1, "{name}: one clear line with {needle:?}:\n{o}");
    }
}
