//! Runtime benchmarks in one test-host run (bench/runtime.sh): end-to-end `husk run` of `true`
//! (a new VM each time) started from a VM snapshot and booted cold, vs `runc run` and `crun run`
//! of the same bundle; the agent's readiness and the `--timings` breakdown in both modes; and
//! the host memory of idle sandboxes, cold vs restored (PSS, which splits the snapshot memory
//! file's shared pages among the VMs that map them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_tests::artifacts::{bin, RuntimeTestKit};
use husk_tests::{balanced_orders, run_job, Job};

const SCRIPT: &str = r##"
mk_rootfs() {
    mkdir -p $1/bin $1/proc $1/sys $1/dev $1/tmp $1/etc
    cp @BUSYBOX@ $1/bin/busybox
    for a in $($1/bin/busybox --list); do [ $a = busybox ] || ln -sf busybox $1/bin/$a; done
}
H=@HUSK@
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mk_rootfs /var/bb
mkdir -p /var/oci /var/oci-sleep
@PROBE@ spec true | sed 's#"path":"rootfs"#"path":"/var/bb"#' > /var/oci/config.json
@PROBE@ spec sleep 300 | sed 's#"path":"rootfs"#"path":"/var/bb"#' > /var/oci-sleep/config.json
# Both shapes' snapshots (OCI containers' and `husk run --rootfs`'s) made ahead, so no timed
# run pays for making one.
@PROBE@ time snapshot-prepare-ms 1 $H snapshot prepare || echo "FAIL husk snapshot prepare"
# Each shape's first restored run records its working set: done here, untimed.
$H --root /run/hb run --bundle /var/oci bench && $H run --net none --rootfs /var/bb -- true || echo "FAIL first restored runs"
# Interleaved, one run of each per round, so that a slower spell of this shared machine falls
# on every runtime alike. The quick runs' order changes each round so that each follows every
# other about equally often (a run after another program finds less of its code in the test
# host's caches; see balanced_orders). Every run is followed by a settle step: a pause, so that
# the work it leaves to the kernel (freeing memory; for husk, destroying its VM, which it does
# not wait for) is done before the next run starts rather than counted in it, and then an
# untimed write to 256 MiB of fresh memory. In this nested test host, the memory a cold VM
# frees is about 10x slower to write the first time it is reused (a 64 MiB touch: about 700 ms
# after a cold VM, with or without another run between, and 57 ms when repeated right after;
# most likely QEMU's TCG dropping the code it translated from those pages), and runc leaves a
# little of the same. Without the touch that cost falls on whichever timed run next allocates
# much, whatever runtime it is. The touch's own time is reported by the run it follows. One
# untimed round first: every runtime's first run reads its binary and libraries, which no later
# run does.
settle() { sleep $2; @PROBE@ touch-memory 256 $1; }
quick() {
    case $1 in
    husk-bundle) @PROBE@ time husk-bundle-restored-ms 1 $H --root /run/hb run --bundle /var/oci bench || echo "FAIL husk run bundle (restored)" ;;
    husk-rootfs) @PROBE@ time husk-rootfs-restored-ms 1 $H run --net none --rootfs /var/bb -- true || echo "FAIL husk run rootfs (restored)" ;;
    *) @PROBE@ time $(basename $1)-run-true-ms 1 $1 --root /run/$(basename $1) run --no-pivot --bundle /var/oci bench || echo "FAIL $1" ;;
    esac
    settle $(basename $1) 0.3
}
cold() {
    @PROBE@ time husk-bundle-cold-ms 1 $H --no-snapshot --root /run/hb run --bundle /var/oci bench || echo "FAIL husk run bundle (cold)"
    settle husk-cold 0.3
    @PROBE@ time husk-rootfs-cold-ms 1 $H --no-snapshot run --net none --rootfs /var/bb -- true || echo "FAIL husk run rootfs (cold)"
    settle husk-cold 1
}
round() {
    for q in "$@"; do quick $q; done
    cold
}
warmup() {
    for q in @QUICK@; do quick $q; done
    cold
}
warmup | grep -v -E '^(BENCH|SETTLE) ' || true
@ROUNDS@
for mode in restored cold; do
    flag=; [ $mode = cold ] && flag=--no-snapshot
    i=0
    while [ $i -lt @N@ ]; do
        settle timings 0.3
        $H $flag run --timings --net none --rootfs /var/bb -- true 2>/tmp/timings >/dev/null || echo "FAIL husk run --timings ($mode)"
        sed "s/^/TIMINGS $mode /" /tmp/timings
        echo "TIMINGS-END $mode"
        i=$((i+1))
    done
done
# Density: @D@ idle OCI sandboxes at once, cold then restored; each set deleted before the next.
kib() { x=$(sed -n "s/^$1:[[:space:]]*\([0-9]*\) kB/\1/p" $2); echo ${x:-0}; }
for mode in cold restored; do
    flag=; [ $mode = cold ] && flag=--no-snapshot
    root=/run/d-$mode
    i=1
    while [ $i -le @D@ ]; do
        $H $flag --root $root run -d --bundle /var/oci-sleep s$i >/dev/null 2>&1 || echo "FAIL husk run -d ($mode s$i)"
        i=$((i+1))
    done
    sleep 3
    i=1
    while [ $i -le @D@ ]; do
        vmm=$(sed -n 's/.*"vmm_pid": \([0-9]*\).*/\1/p' $root/sandboxes/s$i/sandbox.json)
        relay=$(sed -n 's/.*"relay_pid": \([0-9]*\).*/\1/p' $root/containers/s$i/state.json)
        [ -n "$vmm" ] && [ -n "$relay" ] && [ -d /proc/$vmm ] && [ -d /proc/$relay ] || echo "FAIL no husk-vmm or relay for $mode s$i"
        # Guest RAM the VMM touched: the RSS of its guest memory mappings (a cold VM's one
        # anonymous mapping; a restored VM's pieces of the snapshot's memory file and the
        # busy chunks it copied into 2 MiB pages of their own).
        guest=$(awk '/^[0-9a-f]+-[0-9a-f]+ /{path=$6} /^Size:/{size=$2} /^Rss:/{rss=$2} /^AnonHugePages:/{ah=$2}
            /^VmFlags:/{ if (size >= 131072 || path ~ /\/memory$/ || (size == 2048 && ah == 2048)) g+=rss }
            END {print g+0}' /proc/$vmm/smaps)
        r=/proc/$vmm/smaps_rollup
        echo "DENSITY $mode s$i $(kib Pss $r) $(kib Pss_Anon $r) $(kib Rss $r) $guest $(kib VmRSS /proc/$relay/status)"
        i=$((i+1))
    done
    free -k | sed "s/^/FREE $mode /"
    i=1
    while [ $i -le @D@ ]; do
        $H --root $root delete --force s$i || echo "FAIL delete ($mode s$i)"
        i=$((i+1))
    done
done
$H snapshot ls | sed 's/^/SNAPSHOTS /'
"##;

/// Interleaved rounds, one run of each quick command per round: a multiple of the balanced
/// square's size (4 with runc and crun), so each run follows every other equally often. The
/// test host's run-to-run spread is wide (a slow spell doubles a round), so more rounds than
/// the `--timings` runs.
const ROUNDS: usize = 20;
/// `--timings` runs per mode.
const N: usize = 10;
/// Idle sandboxes per density set.
const D: usize = 10;
/// The issue's targets: restored start vs cold, `husk run` restored vs `runc run`, and PSS per
/// idle sandbox restored vs cold.
const TARGET_VS_COLD: f64 = 0.2;
const TARGET_VS_RUNC: f64 = 1.0;
const TARGET_PSS: f64 = 0.5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn verdict(ratio: f64, target: f64) -> String {
    let met = if ratio <= target { "met" } else { "NOT met" };
    format!("target <= {target:.1}x: {met}")
}

type Phases = Vec<(String, f64, f64)>;

/// The `husk run --timings` tables of one mode's runs, parsed.
fn timing_runs(output: &str, mode: &str) -> Vec<Phases> {
    let (line, end) = (format!("TIMINGS {mode} "), format!("TIMINGS-END {mode}"));
    let mut runs = Vec::new();
    let mut text = String::new();
    for l in output.lines() {
        if let Some(rest) = l.strip_prefix(&line) {
            text.push_str(rest);
            text.push('\n');
        } else if l == end {
            let phases = husk_core::timeline::parse(&text);
            if !phases.is_empty() {
                runs.push(phases);
            }
            text.clear();
        }
    }
    runs
}

fn phase_at(phases: &Phases, name: &str) -> Option<f64> {
    phases.iter().find(|(n, _, _)| n.starts_with(name)).map(|p| p.1)
}

/// Median of "agent connected" minus "vmm spawned" over the runs that have both.
fn agent_ready(runs: &[Phases]) -> f64 {
    median(
        runs.iter()
            .filter_map(|p| Some(phase_at(p, "agent connected")? - phase_at(p, "vmm spawned")?))
            .collect(),
    )
}

/// The median breakdown over the runs (phases by name, a repeated name numbered by its
/// occurrence in the run), in the order of the first run.
fn print_breakdown(mode: &str, runs: &[Phases], wall_ms: f64) {
    if runs.is_empty() {
        println!("no `husk run --timings` breakdown ({mode}) in the output");
        return;
    }
    let mut order: Vec<String> = Vec::new();
    let mut values: HashMap<String, (Vec<f64>, Vec<f64>)> = HashMap::new();
    for phases in runs {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (name, at, delta) in phases {
            let n = seen.entry(name).or_default();
            *n += 1;
            let key = if *n == 1 { name.clone() } else { format!("{name} #{n}") };
            if !values.contains_key(&key) {
                order.push(key.clone());
            }
            let e = values.entry(key).or_default();
            e.0.push(*at);
            e.1.push(*delta);
        }
    }
    println!(
        "`husk run --timings --rootfs DIR -- true`, {mode}: median per phase of {} runs (ms since CLI start, ms since the phase before; the whole run took {wall_ms:.1} ms by the clock above):",
        runs.len()
    );
    let width = order.iter().map(|k| k.len()).max().unwrap_or(0);
    for k in &order {
        let (at, delta) = &values[k];
        println!("  {k:<width$}  {:>9.1}  {:>8.1}", median(at.clone()), median(delta.clone()));
    }
}

/// One idle sandbox's memory: husk-vmm PSS (all, and of its anonymous pages: what no sibling
/// shares) and RSS, the guest RAM it touched, relay RSS (KiB).
#[derive(Debug, Clone, Copy)]
struct Idle {
    pss: f64,
    pss_anon: f64,
    rss: f64,
    guest: f64,
    relay: f64,
}

fn density(output: &str, mode: &str) -> Vec<Idle> {
    let prefix = format!("DENSITY {mode} ");
    output
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let v: Vec<f64> = rest.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            match v[..] {
                [pss, pss_anon, rss, guest, relay] => Some(Idle { pss, pss_anon, rss, guest, relay }),
                _ => None,
            }
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let kit = RuntimeTestKit::find().map_err(anyhow::Error::msg)?;
    let probe = bin("husk-agent-probe").map_err(anyhow::Error::msg)?;
    let runtimes: Vec<PathBuf> =
        ["/usr/sbin/runc", "/usr/bin/crun"].iter().map(PathBuf::from).filter(|p| p.is_file()).collect();
    let d = |p: &Path| p.display().to_string();
    let quick: Vec<String> =
        runtimes.iter().map(|p| d(p)).chain(["husk-bundle".into(), "husk-rootfs".into()]).collect();
    let orders = balanced_orders(quick.len(), ROUNDS);
    let rounds: String = orders
        .iter()
        .map(|order| {
            let runs: Vec<&str> = order.iter().map(|&i| quick[i].as_str()).collect();
            format!("round {}\n", runs.join(" "))
        })
        .collect();
    let script = SCRIPT
        .replace("@BUSYBOX@", &d(&kit.busybox))
        .replace("@HUSK@", &d(&kit.husk))
        .replace("@PROBE@", &d(&probe))
        .replace("@QUICK@", &quick.join(" "))
        .replace("@ROUNDS@", &rounds)
        .replace("@N@", &N.to_string())
        .replace("@D@", &D.to_string());
    let mut job = Job::new(script).timeout(Duration::from_secs(2400));
    job.files.extend(kit.files().map(Path::to_path_buf));
    job.files.push(probe);
    job.files.extend(runtimes.iter().cloned());
    // `--no-pivot` for runc/crun: L1's root is the initramfs, which pivot_root refuses.
    // One L1 CPU, as in the runtime test (tests/runtime.rs): two stalled the nested test host.
    job.cpus = 1;
    // Room for D idle VMs of the default 256 MiB at once, plus the snapshots (L1's files are
    // in RAM too).
    job.mem_mib = 6144;
    let out = run_job(&job)?;
    if out.output.contains("FAIL") {
        anyhow::bail!("benchmark failed:\n{}", out.output);
    }
    // One value per round for the timed runs (their median), one in all for the rest.
    let mut samples: HashMap<String, Vec<f64>> = HashMap::new();
    for l in out.output.lines().filter_map(|l| l.strip_prefix("BENCH ")) {
        let mut f = l.split_whitespace();
        if let (Some(k), Some(Ok(v))) = (f.next(), f.next().map(str::parse::<f64>)) {
            samples.entry(k.to_string()).or_default().push(v);
        }
    }
    let get = |k: &str| {
        samples
            .get(k)
            .map(|v| median(v.clone()))
            .ok_or_else(|| anyhow::anyhow!("no {k} in output:\n{}", out.output))
    };
    let place = if out.l1.is_some() {
        "husk VMs = L2 under KVM inside the nested test host (QEMU TCG, ~10x slower than native); runc/crun in L1"
    } else {
        "husk VMs under this host's KVM; runc/crun on this host"
    };
    println!(
        "Runtime benchmarks ({place}); medians of {ROUNDS} runs, a new VM each, runtimes interleaved run by run"
    );
    println!("`husk snapshot prepare` (both shapes, 256 MiB, 1 vCPU): {:.0} ms", get("snapshot-prepare-ms")?);
    let peers: Vec<(String, f64)> = runtimes
        .iter()
        .map(|r| {
            let n = r.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            get(&format!("{n}-run-true-ms")).map(|t| (n, t))
        })
        .collect::<Result<_, _>>()?;
    let rootfs_restored = get("husk-rootfs-restored-ms")?;
    for (what, shape) in [("husk run --rootfs DIR -- true", "rootfs"), ("husk run --bundle B", "bundle")] {
        let (restored, cold) =
            (get(&format!("husk-{shape}-restored-ms"))?, get(&format!("husk-{shape}-cold-ms"))?);
        println!(
            "`{what}`: restored {restored:.1} ms, cold {cold:.1} ms; restored/cold {:.2}x ({})",
            restored / cold,
            verdict(restored / cold, TARGET_VS_COLD)
        );
        for (n, t) in &peers {
            let target = if shape == "rootfs" && n == "runc" {
                format!(" ({})", verdict(restored / t, TARGET_VS_RUNC))
            } else {
                String::new()
            };
            println!(
                "  vs `{n} run` of the same bundle, {t:.1} ms: restored/{n} {:.2}x{target}, cold/{n} {:.2}x",
                restored / t,
                cold / t
            );
        }
    }
    // Per round, then the median: runs of one round are next to each other in time, so a
    // slow spell of the machine cancels out of their ratio.
    let paired = |a: &str, b: &str| -> Option<f64> {
        let (x, y) = (samples.get(a)?, samples.get(b)?);
        (x.len() == y.len() && !x.is_empty()).then(|| median(x.iter().zip(y).map(|(p, q)| p / q).collect()))
    };
    for shape in ["rootfs", "bundle"] {
        let restored = format!("husk-{shape}-restored-ms");
        let mut line = format!("  paired per round ({shape}, median of the rounds' ratios):");
        if let Some(r) = paired(&restored, &format!("husk-{shape}-cold-ms")) {
            line.push_str(&format!(" restored/cold {r:.2}x"));
        }
        for (n, _) in &peers {
            if let Some(r) = paired(&restored, &format!("{n}-run-true-ms")) {
                line.push_str(&format!(", restored/{n} {r:.2}x"));
            }
        }
        println!("{line}");
    }
    // Every timed run in round order, to tell a slow spell from a slow runtime.
    let mut keys: Vec<&String> =
        samples.keys().filter(|k| k.ends_with("-ms") && samples[*k].len() > 1).collect();
    keys.sort();
    for k in keys {
        let v: Vec<String> = samples[k].iter().map(|x| format!("{x:.0}")).collect();
        println!("  runs of {k}: {}", v.join(" "));
    }
    // Each quick run's median by the run before it in its round (husk's cold runs end each
    // round, so they come before every round's first).
    let label =
        |q: &str| Path::new(q).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    for q in &quick {
        let key = match q.as_str() {
            "husk-bundle" | "husk-rootfs" => format!("{q}-restored-ms"),
            _ => format!("{}-run-true-ms", label(q)),
        };
        let Some(runs) = samples.get(&key) else { continue };
        let mut after: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for (order, t) in orders.iter().zip(runs) {
            let before = match order.iter().position(|&i| quick[i] == *q) {
                Some(p) if p > 0 => label(&quick[order[p - 1]]),
                _ => "husk cold".to_string(),
            };
            after.entry(before).or_default().push(*t);
        }
        let parts: Vec<String> = after
            .into_iter()
            .map(|(b, v)| format!("after {b} {:.0} ({} runs)", median(v.clone()), v.len()))
            .collect();
        println!("  {key} by the run before it: {}", parts.join(", "));
    }
    // The settle step's untimed touch, by the run it followed: how much reuse cost each
    // runtime leaves behind (see the script).
    let mut settle: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for l in out.output.lines().filter_map(|l| l.strip_prefix("SETTLE ")) {
        if let Some((k, Ok(v))) = l.split_once(' ').map(|(k, v)| (k, v.trim().parse::<f64>())) {
            settle.entry(k).or_default().push(v);
        }
    }
    let parts: Vec<String> =
        settle.iter().map(|(k, v)| format!("{k} {:.0} ({} runs)", median(v.clone()), v.len())).collect();
    println!(
        "  settle step (untimed 256 MiB write after each run), median by the run before: {}",
        parts.join(", ")
    );
    let (restored_runs, cold_runs) = (timing_runs(&out.output, "restored"), timing_runs(&out.output, "cold"));
    let booted = restored_runs.iter().filter(|p| p.iter().any(|(n, _, _)| n.starts_with("guest:"))).count();
    if booted > 0 {
        println!(
            "WARNING: {booted} of {} `husk run` runs meant to restore booted a guest",
            restored_runs.len()
        );
    }
    let (ready_restored, ready_cold) = (agent_ready(&restored_runs), agent_ready(&cold_runs));
    println!(
        "agent ready (\"vmm spawned\" to \"agent connected\", median of {} / {} `--timings` runs): restored {ready_restored:.1} ms, cold {ready_cold:.1} ms; restored/cold {:.2}x",
        restored_runs.len(),
        cold_runs.len(),
        ready_restored / ready_cold
    );
    print_breakdown("restored", &restored_runs, rootfs_restored);
    print_breakdown("cold", &cold_runs, get("husk-rootfs-cold-ms")?);
    let (cold, restored) = (density(&out.output, "cold"), density(&out.output, "restored"));
    if cold.len() != D || restored.len() != D {
        anyhow::bail!(
            "density: {} cold and {} restored readings, expected {D} each:\n{}",
            cold.len(),
            restored.len(),
            out.output
        );
    }
    println!("density: {D} idle sandboxes at once (`husk run -d --bundle` of `sleep 300`, 256 MiB VMs), husk-vmm per set:");
    let mean = |s: &[Idle], f: fn(&Idle) -> f64| s.iter().map(f).sum::<f64>() / s.len() as f64;
    for (mode, set) in [("cold", &cold), ("restored", &restored)] {
        println!(
            "  {mode:<8}: PSS sum {:.0} KiB, mean {:.0} KiB (anonymous {:.0} KiB); mean RSS {:.0} KiB (guest RAM touched {:.0} KiB); relay mean RSS {:.0} KiB",
            set.iter().map(|i| i.pss).sum::<f64>(),
            mean(set, |i| i.pss),
            mean(set, |i| i.pss_anon),
            mean(set, |i| i.rss),
            mean(set, |i| i.guest),
            mean(set, |i| i.relay)
        );
    }
    let pss_ratio = mean(&restored, |i| i.pss) / mean(&cold, |i| i.pss);
    println!("  restored/cold PSS per sandbox {pss_ratio:.2}x ({})", verdict(pss_ratio, TARGET_PSS));
    for l in out.output.lines().filter_map(|l| l.strip_prefix("FREE ")) {
        println!("  L1 `free -k` with the set running, {l}");
    }
    for l in out.output.lines().filter_map(|l| l.strip_prefix("SNAPSHOTS ")) {
        println!("  snapshots kept: {l}");
    }
    Ok(())
}
