//! Agent benchmarks in one test-host run (bench/agent.sh): the agent's readiness after the kernel
//! hands over, container create+start+wait of `true` in a VM vs the agent in host mode vs
//! `runc run` (and `crun run`) of the same config on the host, stdout stream throughput vs a host
//! pipe, and the agent's RSS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_tests::artifacts::AgentTestKit;
use husk_tests::{bench_values, run_job, Job};

const SCRIPT: &str = r##"
mk_rootfs() {
    mkdir -p $1/bin $1/proc $1/sys $1/dev $1/tmp $1/etc
    cp @BUSYBOX@ $1/bin/busybox
    for a in $($1/bin/busybox --list); do [ $a = busybox ] || ln -sf busybox $1/bin/$a; done
}
mk_rootfs /var/hm/shares/bb/rootfs
mkdir -p /var/oci
@PROBE@ spec true | sed 's#"path":"rootfs"#"path":"/var/hm/shares/bb/rootfs"#' > /var/oci/config.json
unshare -m --propagation private sh -c '
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
    mount -t tmpfs tmpfs /run
    for r in @RUNTIMES@; do
        n=$(basename $r)
        @PROBE@ time $n-run-true-ms @N@ $r --root /run/$n run --no-pivot --bundle /var/oci bench || echo "FAIL $n"
    done
    @PROBE@ pipe-baseline
    @AGENT@ serve --unix /var/hm/agent.sock --shares /var/hm/shares --state /run/husk-agent 2>/dev/null &
    timeout 900 @PROBE@ bench /var/hm/agent.sock bb rootfs @N@ | sed "s/^BENCH /BENCH host-mode-/"
    wait
'
S=/var/vm/share; mk_rootfs $S/rootfs
@VMM@ --kernel @KERNEL@ --initramfs @INITRD@ --memory 512 --vcpus 1 --vsock /var/vm/vsock.sock \
    --fs tag=bb,path=$S,ro --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet @GUEST_LOG@" </dev/null >/var/vm/vm.out 2>&1 &
timeout 900 @PROBE@ bench /var/vm/vsock.sock bb rootfs @N@ | sed "s/^BENCH /BENCH vm-/"
timeout 60 sh -c 'while pidof husk-vmm >/dev/null; do sleep 0.2; done' || { echo "FAIL vm still running"; pkill -9 husk-vmm; }
tail -n 40 /var/vm/vm.out
"##;

const N: usize = 10;

fn main() -> anyhow::Result<()> {
    let kit = AgentTestKit::find().map_err(anyhow::Error::msg)?;
    let runtimes: Vec<PathBuf> =
        ["/usr/sbin/runc", "/usr/bin/crun"].iter().map(PathBuf::from).filter(|p| p.is_file()).collect();
    let d = |p: &Path| p.display().to_string();
    let script = SCRIPT
        .replace("@BUSYBOX@", &d(&kit.busybox))
        .replace("@AGENT@", &d(&kit.agent))
        .replace("@PROBE@", &d(&kit.probe))
        .replace("@VMM@", &d(&kit.vmm))
        .replace("@KERNEL@", &d(&kit.kernel))
        .replace("@INITRD@", &d(&kit.initrd))
        .replace("@RUNTIMES@", &runtimes.iter().map(|p| d(p)).collect::<Vec<_>>().join(" "))
        .replace("@N@", &N.to_string())
        .replace(
            "@GUEST_LOG@",
            &std::env::var("HUSK_BENCH_GUEST_LOG").map(|f| format!("husk.log={f}")).unwrap_or_default(),
        );
    let mut job = Job::new(script).timeout(Duration::from_secs(2400));
    job.files.extend(kit.files().map(Path::to_path_buf));
    job.files.extend(runtimes.iter().cloned());
    // As in the agent test (tests/agent.rs): a 1-vCPU guest, two L1 CPUs.
    job.cpus = 2;
    let out = run_job(&job)?;
    let v = bench_values(&out.output);
    let get = |k: &str| v.get(k).copied().ok_or_else(|| anyhow::anyhow!("no {k} in output:\n{}", out.output));
    if out.output.contains("FAIL") {
        anyhow::bail!("benchmark failed:\n{}", out.output);
    }
    let place = if out.l1.is_some() {
        "VM = L2 under KVM inside the nested test host (QEMU TCG, ~10x slower than native); host = L1"
    } else {
        "VM under this host's KVM; host = this host"
    };
    println!("Agent benchmarks ({place}); medians of {N} runs");
    let vm_true = get("vm-create-start-wait-true-ms")?;
    let host_true = get("host-mode-create-start-wait-true-ms")?;
    println!("create+start+wait `true`: VM {vm_true:.1} ms, agent host mode {host_true:.1} ms (VM/host-mode {:.2}x)", vm_true / host_true);
    for r in &runtimes {
        let n = r.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let t = get(&format!("{n}-run-true-ms"))?;
        println!(
            "  `{n} run` same config on the host: {t:.1} ms (VM/{n} {:.2}x, host-mode/{n} {:.2}x)",
            vm_true / t,
            host_true / t
        );
    }
    let (vm_out, host_out, pipe) =
        (get("vm-stdout-stream-mib-s")?, get("host-mode-stdout-stream-mib-s")?, get("host-pipe-mib-s")?);
    println!(
        "stdout 256 MiB: VM stream {vm_out:.1} MiB/s, host-mode stream {host_out:.1} MiB/s, host pipe {pipe:.1} MiB/s (VM/pipe {:.3}, host-mode/pipe {:.3})",
        vm_out / pipe,
        host_out / pipe
    );
    println!(
        "agent ready {:.2} ms after init started (kernel handed over at {:.1} ms of guest uptime); agent RSS idle {} KiB, after the runs {} KiB",
        get("vm-agent-ready-after-init-ms")?,
        get("vm-init-started-ms")?,
        get("vm-agent-rss-kib")?,
        get("vm-agent-rss-after-kib")?
    );
    Ok(())
}
