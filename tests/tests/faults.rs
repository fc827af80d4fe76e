//! Crashes and leaks, in one test-host boot, through the runc-compatible CLI.
//!
//! Faults: a `husk` call killed by SIGKILL at each of its fault points (`HUSK_FAULT_KILL_AT`,
//! runtime/core/src/fault.rs) in create, start, exec and delete; husk-vmm and a container's
//! relay killed under a running container; the agent's container helper killed in the guest at
//! each of its steps (`husk.fault=` on the guest's command line, agent/src/oci.rs). After each,
//! `husk state` answers, `husk delete --force` converges, and nothing is left: no process, mount,
//! cgroup, state directory or socket.
//!
//! Cycles: create/start/delete cycles one after another and four at a time, while one sandbox
//! stays up and gets an exec per cycle; its husk-vmm's descriptor count and RSS are sampled
//! after each. `HUSK_CYCLES=N` (bench/cycles.sh: 200) runs only the cycles, N of them and N/3
//! rounds of four in parallel; the default is 6 and 2.

use std::path::Path;
use std::time::Duration;

use husk_tests::artifacts::RuntimeTestKit;
use husk_tests::{require, run_job, Job};

const FAULTS: &str = r##"
echo "=== host faults"; uptime_mark
# create: the husk call dies while its VM boots, once its agent answered, around the agent's
# CreateContainer, and once the container is recorded (its relay never told to go).
for p in vmm-booting agent-connected create-before-agent create-after-agent create-recorded; do
    fault $p $H --root $R create --bundle /var/bs f-$p
    converge f-$p $p
done
for p in start-before-agent start-after-agent; do
    $H --root $R create --bundle /var/bs f-$p || echo "@@SETUP-FAILED $p"
    fault $p $H --root $R start f-$p
    converge f-$p $p
done
# exec: a foreground exec's process goes with its husk (the lifeline it held closes).
for p in exec-before-agent exec-after-agent; do
    $H --root $R run -d --bundle /var/bs f-$p >/dev/null 2>&1 || echo "@@SETUP-FAILED $p"
    fault $p $H --root $R exec f-$p sleep 1234
    until_ok 60 sh -c "! $H --root $R ps f-$p | grep -q 'sleep 1234'" && echo "@@EXEC-GONE $p"
    converge f-$p $p
done
for p in delete-after-agent delete-vm-off delete-sandbox-left; do
    $H --root $R run -d --bundle /var/bs f-$p >/dev/null 2>&1 || echo "@@SETUP-FAILED $p"
    fault $p $H --root $R delete --force f-$p
    converge f-$p $p
done

echo "=== kills"; uptime_mark
$H --root $R run -d --bundle /var/bs k-vmm >/dev/null 2>&1 || echo "@@SETUP-FAILED k-vmm"
# The guest command line husk gives its VMs, which the helper faults below extend.
CMDLINE=$(sed -n 's/^ *"cmdline": "\(.*\)",$/\1/p' $R/sandboxes/k-vmm/vm.json)
[ -n "$CMDLINE" ] || echo "@@SETUP-FAILED cmdline"
kill -9 $(vmm_of k-vmm)
until_ok 60 sh -c "$H --root $R state k-vmm | grep -q '\"status\": \"stopped\"'" && echo "@@VMM-KILLED-STOPPED"
converge k-vmm vmm-killed
$H --root $R create --bundle /var/bs --pid-file /var/relay.pid k-relay && $H --root $R start k-relay \
    || echo "@@SETUP-FAILED k-relay"
kill -9 $(cat /var/relay.pid)
# The relay held the container's lifeline: the agent kills the container.
until_ok 60 sh -c "$H --root $R state k-relay | grep -q '\"status\": \"stopped\"'" && echo "@@RELAY-KILLED-STOPPED"
converge k-relay relay-killed

echo "=== helper faults"; uptime_mark
# A pod: its members' creates fail or succeed in a VM that stays, so what a killed helper left
# in the guest shows when the same id is used again. Each fault fires once per boot.
CRI='"io.kubernetes.cri.container-type"'
bundle /var/hp '["sleep","300"]' "{$CRI:\"sandbox\",\"io.kubernetes.cri.sandbox-id\":\"hp\"}"
HUSK_CMDLINE="$CMDLINE husk.fault=oci-create@m1,oci-created@m2,oci-start@m3,oci-exec@m3,oci-delete@m3,oci-start@m4" \
    $H --root $R run -d --bundle /var/hp --pid-file /var/hp.pid hp >/dev/null 2>&1; echo "@@HP-RC $?"
ns="{\"type\":\"ipc\",\"path\":\"/proc/$(cat /var/hp.pid)/ns/ipc\"},{\"type\":\"network\",\"path\":\"/proc/$(cat /var/hp.pid)/ns/net\"}"
for m in m1 m2 m3; do
    bundle /var/$m '["sleep","300"]' "{$CRI:\"container\",\"io.kubernetes.cri.sandbox-id\":\"hp\"}" "$ns"
done
bundle /var/m4 '["sh","-c","echo m4-ran"]' "{$CRI:\"container\",\"io.kubernetes.cri.sandbox-id\":\"hp\"}" "$ns"
for m in m1 m2; do
    $H --root $R create --bundle /var/$m $m 2>&1; echo "@@HELPER-CREATE-RC $m $?"
    $H --root $R state $m >/dev/null 2>&1 && echo "@@HELPER-CREATE-LEFT $m"
    $H --root $R create --bundle /var/$m $m 2>&1 && $H --root $R start $m; echo "@@HELPER-AGAIN-RC $m $?"
    $H --root $R delete --force $m; echo "@@HELPER-DELETE-RC $m $?"
done
$H --root $R create --bundle /var/m3 m3 || echo "@@SETUP-FAILED m3"
$H --root $R start m3 2>&1; echo "@@HELPER-START-RC $?"
echo "@@HELPER-START-STATE $(status_of m3)"
$H --root $R start m3; echo "@@HELPER-START-AGAIN-RC $?"
$H --root $R exec m3 true 2>&1; echo "@@HELPER-EXEC-RC $?"
$H --root $R exec m3 sh -c 'echo exec-after-fault'; echo "@@HELPER-EXEC-AGAIN-RC $?"
$H --root $R delete --force m3 2>&1; echo "@@HELPER-DELETE-RC m3 $?"
$H --root $R create --bundle /var/m3 m3 && $H --root $R start m3; echo "@@HELPER-AGAIN-RC m3 $?"
$H --root $R delete --force m3; echo "@@HELPER-DELETE-RC m3-again $?"
# A foreground run has the agent start its process with the create: a start that fails there
# fails the run, and nothing of the container stays.
$H --root $R run --bundle /var/m4 m4 >/var/m4.out 2>&1; echo "@@HELPER-RUN-RC $?"
cat /var/m4.out
grep -q "fault injected at oci-start" /var/m4.out && echo "@@HELPER-RUN-START-FAILED"
grep -q m4-ran /var/m4.out && echo "@@HELPER-RUN-RAN"
$H --root $R state m4 >/dev/null 2>&1 && echo "@@HELPER-RUN-LEFT"
$H --root $R run --bundle /var/m4 m4; echo "@@HELPER-RUN-AGAIN-RC $?"
$H --root $R delete --force hp; echo "@@HP-DELETE-RC $?"
leftovers helper
"##;

const CYCLES: &str = r##"
echo "=== cycles"; uptime_mark
# The long-lived sandbox outlives any cycle count (bench/cycles.sh runs for about an hour).
bundle /var/bl '["sleep","864000"]'
$H --root $R run -d --bundle /var/bl lg >/dev/null 2>&1; echo "@@LG-RC $?"
lvmm=$(vmm_of lg)
echo "@@LG-VMM $lvmm"
# The long-lived VMM after each cycle: descriptors, RSS, RSS less guest RAM (its mapping is
# the only one of 128 MiB or more), and host state that must stay as it is.
# From the first sample after warm-up on, a count off that one is read again for up to 5 s: the
# VMM closes a finished exec's stream sockets once the guest has closed its side, which can
# come after `exec` returns. A leaked descriptor stays, and fails the check.
taken=0; base=
sample() {
    fds=$(ls /proc/$lvmm/fd | wc -l)
    k=0
    while [ -n "$base" ] && [ "$fds" != "$base" ] && [ $k -lt 50 ]; do
        sleep 0.1; fds=$(ls /proc/$lvmm/fd | wc -l); k=$((k + 1))
    done
    taken=$((taken + 1)); [ $taken -eq $((@WARM_UP@ + 1)) ] && base=$fds
    rss=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' /proc/$lvmm/status)
    own=$(awk '/^Size:/{s=$2} /^Rss:/{ if (s < 131072) o += $2 } END {print o+0}' /proc/$lvmm/smaps)
    mounts=$(grep -c " $R" /proc/mounts)
    procs=$(husk_procs | wc -l)
    echo "@@SAMPLE $1 fds=$fds rss=$rss own=$own mounts=$mounts procs=$procs"
}
cycle() {
    $H --root $R create --bundle /var/bs $1 >/dev/null 2>&1 && $H --root $R start $1 \
        && $H --root $R delete --force $1 || echo "@@CYCLE-FAILED $1"
}
sample 0
i=1
while [ $i -le $N ]; do
    cycle s$i
    $H --root $R exec lg true || echo "@@EXEC-FAILED s$i"
    sample s$i
    i=$((i + 1))
done
r=1
while [ $r -le $ROUNDS ]; do
    pids=""
    for j in 1 2 3 4; do cycle p$r-$j & pids="$pids $!"; done
    wait $pids
    $H --root $R exec lg true || echo "@@EXEC-FAILED p$r"
    sample p$r
    r=$((r + 1))
done
$H --root $R delete --force lg; echo "@@LG-DELETE-RC $?"
leftovers cycles
uptime_mark
"##;

const PRELUDE: &str = r##"
H=@HUSK@
R=/run/husk-faults
N=@CYCLES@
ROUNDS=@ROUNDS@
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "@@NO-CGROUP2"
mk_rootfs() {
    mkdir -p $1/bin $1/proc $1/sys $1/dev $1/tmp $1/etc $1/run
    cp @BUSYBOX@ $1/bin/busybox
    for a in $($1/bin/busybox --list); do [ $a = busybox ] || ln -sf busybox $1/bin/$a; done
}
# bundle DIR ARGS-JSON [ANNOTATIONS-JSON] [IPC+NETWORK-NAMESPACES-JSON]: config.json over /var/bb.
bundle() {
    mkdir -p $1
    ann=${3:-'{}'}
    ns=${4:-'{"type":"ipc"},{"type":"network"}'}
    cat > $1/config.json <<EOC
{"ociVersion":"1.0.2","annotations":$ann,
 "process":{"user":{"uid":0,"gid":0},"args":$2,"env":["PATH=/bin"],"cwd":"/"},
 "root":{"path":"/var/bb","readonly":false},
 "mounts":[{"destination":"/proc","type":"proc","source":"proc"},
           {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","mode=755"]}],
 "linux":{"namespaces":[{"type":"pid"},{"type":"mount"},$ns],
   "resources":{"memory":{"limit":67108864}}}}
EOC
}
# until_ok SECONDS CMD...: retries CMD every 0.2 s.
until_ok() { t=$1; shift; i=0; while ! "$@" >/dev/null 2>&1; do i=$((i+1)); [ $i -ge $((t*5)) ] && return 1; sleep 0.2; done; }
# Seconds since L1 booted, to time the parts.
uptime_mark() { echo "@@UPTIME $(cut -d' ' -f1 /proc/uptime)"; }
vmm_of() { sed -n 's/.*"vmm_pid": *\([0-9]*\).*/\1/p' $R/sandboxes/$1/sandbox.json; }
status_of() { $H --root $R state $1 2>/dev/null | sed -n 's/.*"status": "\([a-z]*\)".*/\1/p'; }
# husk's processes: VMMs (started as `<dir>/./husk-vmm`), relays and CLI calls.
PROCS='husk-vmm |husk __relay|husk --root'
husk_procs() { ps -o pid,args | grep -v grep | grep -E "$PROCS"; }
# leftovers TAG: nothing of any container is left.
leftovers() {
    until_ok 20 sh -c "! ps -o args | grep -v grep | grep -Eq '$PROCS'" \
        || { echo "@@LEFT-PROCESS $1"; husk_procs | cut -c1-200; }
    grep " $R" /proc/mounts && echo "@@LEFT-MOUNT $1"
    find $R/containers $R/sandboxes $R/netns -mindepth 1 2>/dev/null | grep -q . \
        && { echo "@@LEFT-STATE $1"; find $R | head -20; }
    find $R -type s 2>/dev/null | grep -q . && { echo "@@LEFT-SOCKET $1"; find $R -type s; }
    # No process is left in a sandbox's cgroup when husk returns. The cgroup itself goes a
    # moment later: KVM's kernel threads for the VM stay in it until the kernel has destroyed
    # the VM, which husk leaves to a detached process that then removes the cgroup.
    for c in /sys/fs/cgroup/husk/*/; do
        [ -e "${c}cgroup.procs" ] || continue
        for p in $(cat ${c}cgroup.procs); do
            [ -s /proc/$p/cmdline ] && { echo "@@LEFT-CGROUP-PROCESS $1 $c $p"; cat /proc/$p/cmdline | tr '\0' ' '; echo; }
        done
    done
    until_ok 10 sh -c '! find /sys/fs/cgroup/husk -mindepth 1 -maxdepth 1 -type d | grep -q .' \
        || { echo "@@LEFT-CGROUP $1"; ls /sys/fs/cgroup/husk; }
    echo "@@CLEAN-CHECKED $1"
}
# fault POINT CMD...: runs CMD with husk's fault point POINT armed; it must die there (137).
fault() { p=$1; shift; HUSK_FAULT_KILL_AT=$p timeout 600 "$@" >/var/fault.out 2>&1; echo "@@FAULT $p rc=$?"; }
# converge ID TAG: `state` answers (any status, or no such container), a forced delete succeeds,
# and nothing is left.
converge() {
    out=$(timeout 300 $H --root $R state $1 2>&1); rc=$?
    st=$(echo "$out" | sed -n 's/.*"status": "\([a-z]*\)".*/\1/p')
    if [ $rc = 0 ] && [ -n "$st" ]; then echo "@@STATE $2 $st"
    elif echo "$out" | grep -q 'container does not exist'; then echo "@@STATE $2 gone"
    else echo "@@STATE-BAD $2 rc=$rc $out"; fi
    timeout 300 $H --root $R delete --force $1 2>&1; echo "@@DELETE $2 rc=$?"
    $H --root $R state $1 >/dev/null 2>&1 && echo "@@STILL-THERE $2"
    leftovers $2
}
mk_rootfs /var/bb
bundle /var/bs '["sleep","300"]'
# If a step stalls, the process list says where: on L1's console, whose tail a timeout reports
# (in the output it could land inside a section that a check reads whole).
( while sleep 120; do { echo "@@WATCH"; ps -o pid,ppid,stat,args | grep -v '\[' | cut -c1-160; } >/dev/console; done ) & watch=$!
"##;

/// Host fault points, as `fault.rs` callers name them.
const HOST_POINTS: [&str; 12] = [
    "vmm-booting",
    "agent-connected",
    "create-before-agent",
    "create-after-agent",
    "create-recorded",
    "start-before-agent",
    "start-after-agent",
    "exec-before-agent",
    "exec-after-agent",
    "delete-after-agent",
    "delete-vm-off",
    "delete-sandbox-left",
];

/// One `@@SAMPLE` line.
#[derive(Debug)]
struct Sample {
    name: String,
    fds: u64,
    rss: u64,
    own: u64,
    mounts: u64,
    procs: u64,
}

fn samples(o: &str) -> Vec<Sample> {
    o.lines()
        .filter_map(|l| l.strip_prefix("@@SAMPLE "))
        .map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next().unwrap_or_default().to_string();
            let kv: std::collections::HashMap<&str, u64> =
                f.filter_map(|p| p.split_once('=')).filter_map(|(k, v)| Some((k, v.parse().ok()?))).collect();
            let get = |k: &str| *kv.get(k).unwrap_or_else(|| panic!("{k} missing in sample {l:?}"));
            Sample {
                name,
                fds: get("fds"),
                rss: get("rss"),
                own: get("own"),
                mounts: get("mounts"),
                procs: get("procs"),
            }
        })
        .collect()
}

fn expect(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "expected {n:?} in:\n{text}");
    }
}

/// Samples taken before the VMM's descriptor and heap use settle (its first exec connections).
const WARM_UP: usize = 2;
/// Growth of the long-lived VMM's own RSS (guest RAM excluded) allowed over the cycles after
/// warm-up. Each exec opens five vsock streams (gRPC, stdin, stdout, stderr, lifeline) whose
/// buffers are freed when they close; the VMM maps blocks over 128 KiB on their own (unmapped
/// when freed) and never trims its heaps, so what it keeps is its peak, reached during warm-up
/// (measured: 0 KiB of growth after it, in every run). 1 MiB is four 256 KiB stream windows: a
/// leak of one window per exec crosses it within the six execs after warm-up in CI.
const OWN_RSS_GROWTH_KIB: u64 = 1024;

#[test]
fn faults_converge_and_cycles_leak_nothing() {
    let kit = require!(RuntimeTestKit::find());
    let bench: Option<usize> =
        std::env::var("HUSK_CYCLES").ok().map(|v| v.parse().expect("HUSK_CYCLES: a number"));
    let n = bench.unwrap_or(6);
    let rounds = (n / 3).max(1);
    let d = |p: &Path| p.display().to_string();
    let body = if bench.is_some() { CYCLES.to_string() } else { format!("{FAULTS}{CYCLES}") };
    let script = format!("{PRELUDE}{body}kill $watch\n")
        .replace("@HUSK@", &d(&kit.husk))
        .replace("@BUSYBOX@", &d(&kit.busybox))
        .replace("@CYCLES@", &n.to_string())
        .replace("@ROUNDS@", &rounds.to_string())
        .replace("@WARM_UP@", &WARM_UP.to_string());
    // Nested, the whole default run takes about 90 s (~30 VM boots; 4 minutes before L1 ran a
    // periodic tick); the limit leaves room for a slower host: 30 s per sequential cycle and
    // 60 s per parallel round on top.
    let secs = 1200 + 30 * n as u64 + 60 * rounds as u64;
    let mut job = Job::new(script).timeout(Duration::from_secs(secs));
    job.files.extend([&kit.husk, &kit.vmm, &kit.kernel, &kit.initrd, &kit.busybox].map(|p| p.to_path_buf()));
    // As tests/runtime.rs: one L1 CPU (two stalled the nested host under load).
    job.cpus = 1;
    job.mem_mib = 3072;
    job.stall_after = Some(Duration::from_secs(420));
    let out = run_job(&job).unwrap_or_else(|e| panic!("test host failed: {e}"));
    let o = &out.output;
    eprintln!("test host: {:?}\n{o}", out.elapsed);
    assert!(!o.contains("@@NO-CGROUP2"), "{o}");
    assert!(!o.contains("@@LEFT-"), "something was left behind:\n{o}");
    assert!(!o.contains("@@SETUP-FAILED"), "{o}");
    assert!(!o.contains("@@STATE-BAD"), "`husk state` failed after a fault:\n{o}");
    assert!(!o.contains("@@STILL-THERE"), "a forced delete left the container:\n{o}");

    if bench.is_none() {
        for p in HOST_POINTS {
            expect(
                o,
                &[
                    &format!("@@FAULT {p} rc=137"),
                    &format!("@@DELETE {p} rc=0"),
                    &format!("@@CLEAN-CHECKED {p}"),
                ],
            );
        }
        // Where the calls died, as `state` then saw it. A create killed once it recorded the
        // container leaves it created until its relay's exit (EOF on its go pipe) has closed
        // the lifeline and the agent has killed the container.
        for (p, states) in [
            ("vmm-booting", &["gone"][..]),
            ("agent-connected", &["gone"]),
            ("create-before-agent", &["gone"]),
            ("create-after-agent", &["gone"]),
            ("create-recorded", &["stopped", "created"]),
            ("start-before-agent", &["created"]),
            ("start-after-agent", &["running"]),
            ("exec-before-agent", &["running"]),
            ("exec-after-agent", &["running"]),
            ("delete-after-agent", &["stopped"]),
            ("delete-vm-off", &["stopped"]),
            ("delete-sandbox-left", &["stopped"]),
        ] {
            let seen = o.lines().find_map(|l| l.strip_prefix(&format!("@@STATE {p} ")));
            assert!(
                seen.is_some_and(|s| states.contains(&s)),
                "{p}: state {seen:?}, expected one of {states:?}:\n{o}"
            );
        }
        expect(
            o,
            &[
                "@@EXEC-GONE exec-before-agent",
                "@@EXEC-GONE exec-after-agent",
                "@@VMM-KILLED-STOPPED",
                "@@DELETE vmm-killed rc=0",
                "@@CLEAN-CHECKED vmm-killed",
                "@@RELAY-KILLED-STOPPED",
                "@@DELETE relay-killed rc=0",
                "@@CLEAN-CHECKED relay-killed",
                "@@HP-RC 0",
                // A create whose helper died fails, records nothing, and the id works again.
                "without a report",
                "@@HELPER-AGAIN-RC m1 0",
                "@@HELPER-AGAIN-RC m2 0",
                "@@HELPER-START-STATE created",
                "@@HELPER-START-AGAIN-RC 0",
                "exec-after-fault\n@@HELPER-EXEC-AGAIN-RC 0",
                // The delete whose helper died still succeeds, and leaves the id usable.
                "@@HELPER-DELETE-RC m3 0",
                "@@HELPER-AGAIN-RC m3 0",
                "@@HELPER-DELETE-RC m3-again 0",
                "@@HELPER-RUN-START-FAILED",
                "m4-ran\n@@HELPER-RUN-AGAIN-RC 0",
                "@@HP-DELETE-RC 0",
                "@@CLEAN-CHECKED helper",
            ],
        );
        for rc in [
            "@@HELPER-CREATE-RC m1 0",
            "@@HELPER-CREATE-RC m2 0",
            "@@HELPER-START-RC 0",
            "@@HELPER-EXEC-RC 0",
            "@@HELPER-RUN-RC 0",
        ] {
            assert!(!o.contains(rc), "{rc}: the helper's fault did not fire:\n{o}");
        }
        assert!(!o.contains("@@HELPER-CREATE-LEFT"), "a failed create left a record:\n{o}");
        assert!(!o.contains("@@HELPER-RUN-LEFT"), "a run whose start failed left a record:\n{o}");
        assert!(!o.contains("@@HELPER-RUN-RAN"), "the run whose start failed ran:\n{o}");
    }

    expect(o, &["@@LG-RC 0", "@@LG-DELETE-RC 0", "@@CLEAN-CHECKED cycles"]);
    assert!(!o.contains("@@CYCLE-FAILED") && !o.contains("@@EXEC-FAILED"), "{o}");
    let s = samples(o);
    assert_eq!(s.len(), 1 + n + rounds, "samples:\n{o}");
    let settled = &s[WARM_UP..];
    let (first, last) = (&settled[0], &settled[settled.len() - 1]);
    // What is sampled is what runs: the long-lived sandbox's VMM and relay, its two mounts.
    assert_eq!((first.procs, first.mounts), (2, 2), "samples: {s:?}");
    eprintln!(
        "long-lived husk-vmm over {n} sequential cycles and {rounds} rounds of 4: fds {} -> {} ({} at start), \
         RSS {} -> {} KiB ({} at start), own RSS (guest RAM excluded) {} -> {} KiB ({} at start)",
        first.fds, last.fds, s[0].fds, first.rss, last.rss, s[0].rss, first.own, last.own, s[0].own
    );
    for x in settled {
        assert_eq!(x.fds, first.fds, "descriptors of the long-lived VMM changed at {}: {s:?}", x.name);
        assert_eq!(
            (x.mounts, x.procs),
            (first.mounts, first.procs),
            "host state changed at {}: {s:?}",
            x.name
        );
    }
    let growth = last.own.saturating_sub(first.own);
    assert!(growth <= OWN_RSS_GROWTH_KIB, "the VMM's own RSS grew {growth} KiB over the cycles: {s:?}");
}
