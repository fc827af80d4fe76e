//! Shim benchmarks in one test-host run (bench/shim.sh), all through one containerd 1.6 with
//! its CRI plugin: a pod ready (RunPodSandbox + CreateContainer + StartContainer of `sleep`)
//! and an ExecSync round trip with the `husk-shim` handler (containerd-shim-husk-v2), the
//! `husk` handler (containerd's runc shim with husk as its binary) and the `runc` handler; and
//! the host memory of a running pod's shim and VMM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_tests::artifacts::{bin, guest_bin, RuntimeTestKit};
use husk_tests::{bench_values, run_job, Job};

const SCRIPT: &str = r##"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
until_ok() { t=$1; shift; i=0; while ! "$@" >/dev/null 2>&1; do i=$((i+1)); [ $i -ge $((t*5)) ] && return 1; sleep 0.2; done; }
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /var/lib/containerd /etc/containerd /var/cri
echo '127.0.0.1 localhost' > /etc/hosts; echo 'nameserver 127.0.0.53' > /etc/resolv.conf; hostname node
mount -t tmpfs tmpfs /var/lib/containerd
cat > /etc/containerd/config.toml <<EOC
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "husk.test/pause:1"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      # L1's root is its initramfs, which pivot_root refuses.
      NoPivotRoot = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk.options]
      BinaryName = "@HUSK@"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk-shim]
    runtime_type = "io.containerd.husk.v2"
EOC
PATH=$PATH:@BINDIR@ containerd >/var/containerd.log 2>&1 &
until_ok 60 ctr version || echo "FAIL containerd"
@PROBE@ images /var/cri/img @PAUSE@ @BUSYBOX@ >/dev/null
ctr -n k8s.io images import /var/cri/img/pause.tar >/dev/null && ctr -n k8s.io images import /var/cri/img/bb.tar >/dev/null \
    || echo "FAIL import"
@PROBE@ bench /run/containerd/containerd.sock @N@ runc husk husk-shim || { echo "FAIL bench"; grep -i error /var/containerd.log | tail -5; }
"##;

const N: usize = 5;

fn main() -> anyhow::Result<()> {
    let kit = RuntimeTestKit::find().map_err(anyhow::Error::msg)?;
    let probe = bin("husk-cri-probe").map_err(anyhow::Error::msg)?;
    let pause = guest_bin("husk-pause").map_err(anyhow::Error::msg)?;
    let runc = PathBuf::from("/usr/sbin/runc");
    let d = |p: &Path| p.display().to_string();
    let script = SCRIPT
        .replace("@HUSK@", &d(&kit.husk))
        .replace("@PROBE@", &d(&probe))
        .replace("@PAUSE@", &d(&pause))
        .replace("@BUSYBOX@", &d(&kit.busybox))
        .replace("@BINDIR@", &d(kit.shim.parent().unwrap_or(Path::new("/"))))
        .replace("@N@", &N.to_string());
    let mut job = Job::new(script).timeout(Duration::from_secs(2400));
    job.files.extend(kit.files().map(Path::to_path_buf));
    job.files.extend([probe, pause, runc]);
    // One L1 CPU, as in the tests: two stalled the nested test host.
    job.cpus = 1;
    job.mem_mib = 3072;
    let out = run_job(&job)?;
    if out.output.contains("FAIL") {
        anyhow::bail!("benchmark failed:\n{}", out.output);
    }
    let v = bench_values(&out.output);
    let get = |k: &str| v.get(k).copied().ok_or_else(|| anyhow::anyhow!("no {k} in output:\n{}", out.output));
    println!("Shim benchmarks (husk VMs = L2 inside the nested test host; runc in L1); medians of {N} pods");
    let (runc_ready, runc_exec) = (get("runc-pod-ready-ms")?, get("runc-execsync-ms")?);
    println!("  runc handler:  pod ready {runc_ready:.0} ms, ExecSync {runc_exec:.0} ms");
    for (h, what) in [("husk", "runc shim + husk binary"), ("husk-shim", "containerd-shim-husk-v2")] {
        let (ready, exec) = (get(&format!("{h}-pod-ready-ms"))?, get(&format!("{h}-execsync-ms"))?);
        println!(
            "  {h} ({what}): pod ready {ready:.0} ms ({:.2}x runc), ExecSync {exec:.0} ms ({:.2}x runc)",
            ready / runc_ready,
            exec / runc_exec
        );
    }
    let (sready, hready) = (get("husk-shim-pod-ready-ms")?, get("husk-pod-ready-ms")?);
    let (sexec, hexec) = (get("husk-shim-execsync-ms")?, get("husk-execsync-ms")?);
    println!(
        "  husk shim vs runc shim + husk: pod ready {:.2}x, ExecSync {:.2}x",
        sready / hready,
        sexec / hexec
    );
    println!(
        "  per pod: husk shim RSS {:.0} KiB (runc shim {:.0} KiB), husk-vmm RSS {:.0} KiB",
        get("husk-shim-shim-rss-kib")?,
        get("runc-shim-rss-kib")?,
        get("husk-shim-vmm-rss-kib")?
    );
    Ok(())
}
