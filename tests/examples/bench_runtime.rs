//! Runtime benchmarks in one test-host run (bench/runtime.sh): end-to-end `husk run` of `true`
//! (a new VM each time) vs `runc run` and `crun run` of the same bundle, and the host RSS of a
//! running sandbox (husk-vmm, of which guest RAM it touched, and the relay process).

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_tests::artifacts::{bin, RuntimeTestKit};
use husk_tests::{bench_values, run_job, Job};

const SCRIPT: &str = r##"
mk_rootfs() {
    mkdir -p $1/bin $1/proc $1/sys $1/dev $1/tmp $1/etc
    cp @BUSYBOX@ $1/bin/busybox
    for a in $($1/bin/busybox --list); do [ $a = busybox ] || ln -sf busybox $1/bin/$a; done
}
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mk_rootfs /var/bb
mkdir -p /var/oci /var/oci-sleep
@PROBE@ spec true | sed 's#"path":"rootfs"#"path":"/var/bb"#' > /var/oci/config.json
@PROBE@ spec sleep 300 | sed 's#"path":"rootfs"#"path":"/var/bb"#' > /var/oci-sleep/config.json
for r in @RUNTIMES@; do
    n=$(basename $r)
    @PROBE@ time $n-run-true-ms @N@ $r --root /run/$n run --no-pivot --bundle /var/oci bench || echo "FAIL $n"
done
@PROBE@ time husk-run-bundle-true-ms @N@ @HUSK@ --root /run/hb run --bundle /var/oci bench || echo "FAIL husk run bundle"
@PROBE@ time husk-run-rootfs-true-ms @N@ @HUSK@ run --net none --rootfs /var/bb -- true || echo "FAIL husk run rootfs"
i=0
while [ $i -lt @N@ ]; do
    @HUSK@ run --timings --net none --rootfs /var/bb -- true 2>/tmp/timings >/dev/null || echo "FAIL husk run --timings"
    sed 's/^/TIMINGS /' /tmp/timings
    echo "TIMINGS-END"
    i=$((i+1))
done
@HUSK@ --root /run/hs run -d --bundle /var/oci-sleep s1 >/dev/null 2>&1 || echo "FAIL husk run -d"
sleep 2
vmm=$(sed -n 's/.*"vmm_pid": \([0-9]*\).*/\1/p' /run/hs/sandboxes/s1/sandbox.json)
relay=$(sed -n 's/.*"relay_pid": \([0-9]*\).*/\1/p' /run/hs/containers/s1/state.json)
rss() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' /proc/$1/status; }
echo "BENCH vmm-rss-kib $(rss $vmm)"
echo "BENCH relay-rss-kib $(rss $relay)"
# Guest RAM the VMM touched: the RSS of its largest anonymous mapping (the guest memory).
awk '/^[0-9a-f]+-[0-9a-f]+ /{big=0} /^Size:/{size=$2} /^Rss:/{ if (size >= 131072 && $2 > g) g=$2 } END {print "BENCH vmm-guest-ram-rss-kib " g+0}' /proc/$vmm/smaps
@HUSK@ --root /run/hs delete --force s1 || echo "FAIL delete"
"##;

const N: usize = 10;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median `husk run --timings` breakdown over the runs (phases by name, a repeated name
/// numbered by its occurrence in the run), in the order of the first run.
fn print_breakdown(output: &str, wall_ms: f64) {
    let mut order: Vec<String> = Vec::new();
    let mut values: std::collections::HashMap<String, (Vec<f64>, Vec<f64>)> = Default::default();
    let mut runs = 0;
    for run in output.split("TIMINGS-END") {
        let text: String =
            run.lines().filter_map(|l| l.strip_prefix("TIMINGS ")).map(|l| format!("{l}\n")).collect();
        let phases = husk_core::timeline::parse(&text);
        if phases.is_empty() {
            continue;
        }
        runs += 1;
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        for (name, at, delta) in phases {
            let n = seen.entry(name.clone()).or_default();
            *n += 1;
            let key = if *n == 1 { name } else { format!("{name} #{n}") };
            if !values.contains_key(&key) {
                order.push(key.clone());
            }
            let e = values.entry(key).or_default();
            e.0.push(at);
            e.1.push(delta);
        }
    }
    if runs == 0 {
        println!("no `husk run --timings` breakdown in the output");
        return;
    }
    println!("`husk run --timings --rootfs DIR -- true`, median per phase of {runs} runs (ms since CLI start, ms since the phase before; the whole run took {wall_ms:.1} ms by the clock above):");
    let width = order.iter().map(|k| k.len()).max().unwrap_or(0);
    for k in &order {
        let (at, delta) = &values[k];
        println!("  {k:<width$}  {:>9.1}  {:>8.1}", median(at.clone()), median(delta.clone()));
    }
}

fn main() -> anyhow::Result<()> {
    let kit = RuntimeTestKit::find().map_err(anyhow::Error::msg)?;
    let probe = bin("husk-agent-probe").map_err(anyhow::Error::msg)?;
    let runtimes: Vec<PathBuf> =
        ["/usr/sbin/runc", "/usr/bin/crun"].iter().map(PathBuf::from).filter(|p| p.is_file()).collect();
    let d = |p: &Path| p.display().to_string();
    let script = SCRIPT
        .replace("@BUSYBOX@", &d(&kit.busybox))
        .replace("@HUSK@", &d(&kit.husk))
        .replace("@PROBE@", &d(&probe))
        .replace("@RUNTIMES@", &runtimes.iter().map(|p| d(p)).collect::<Vec<_>>().join(" "))
        .replace("@N@", &N.to_string());
    let mut job = Job::new(script).timeout(Duration::from_secs(2400));
    job.files.extend(kit.files().map(Path::to_path_buf));
    job.files.push(probe);
    job.files.extend(runtimes.iter().cloned());
    // `--no-pivot` for runc/crun: L1's root is the initramfs, which pivot_root refuses.
    // One L1 CPU, as in the runtime test (tests/runtime.rs): two stalled the nested test host.
    job.cpus = 1;
    job.mem_mib = 3072;
    let out = run_job(&job)?;
    if out.output.contains("FAIL") {
        anyhow::bail!("benchmark failed:\n{}", out.output);
    }
    let v = bench_values(&out.output);
    let get = |k: &str| v.get(k).copied().ok_or_else(|| anyhow::anyhow!("no {k} in output:\n{}", out.output));
    let place = if out.l1.is_some() {
        "husk VMs = L2 under KVM inside the nested test host (QEMU TCG, ~10x slower than native); runc/crun in L1"
    } else {
        "husk VMs under this host's KVM; runc/crun on this host"
    };
    println!("Runtime benchmarks ({place}); medians of {N} runs");
    let rootfs = get("husk-run-rootfs-true-ms")?;
    let bundle = get("husk-run-bundle-true-ms")?;
    println!(
        "`husk run --rootfs DIR -- true` {rootfs:.1} ms; `husk run --bundle B` {bundle:.1} ms (new VM each)"
    );
    for r in &runtimes {
        let n = r.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let t = get(&format!("{n}-run-true-ms"))?;
        println!(
            "  `{n} run` of the same bundle: {t:.1} ms (husk bundle/{n} {:.2}x, husk rootfs/{n} {:.2}x)",
            bundle / t,
            rootfs / t
        );
    }
    print_breakdown(&out.output, rootfs);
    let (vmm, guest, relay) = (get("vmm-rss-kib")?, get("vmm-guest-ram-rss-kib")?, get("relay-rss-kib")?);
    println!(
        "per running sandbox: husk-vmm RSS {vmm:.0} KiB (guest RAM touched {guest:.0} KiB, VMM overhead {:.0} KiB), relay RSS {relay:.0} KiB",
        vmm - guest
    );
    Ok(())
}
