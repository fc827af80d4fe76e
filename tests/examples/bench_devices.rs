//! Device benchmarks, guest against host-native in one test-host run: vsock guest→host stream
//! throughput vs a host Unix socket pair, virtio-fs sequential read of a 256 MiB file and a
//! create+stat+unlink loop (10k) vs the same on the host directory. Run via bench/devices.sh.

use std::collections::BTreeMap;
use std::time::Duration;

use husk_tests::artifacts::{bin, guest_artifact};
use husk_tests::{run_job, Job};

fn values(output: &str, prefix: &str) -> BTreeMap<String, (f64, String)> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, value, unit) = (f.next()?, f.next()?.parse().ok()?, f.next()?);
            Some((name.to_string(), (value, unit.to_string())))
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let vmm = bin("husk-vmm").map_err(anyhow::Error::msg)?;
    let probe = bin("husk-vsock-probe").map_err(anyhow::Error::msg)?;
    let kernel = guest_artifact("vmlinux").map_err(anyhow::Error::msg)?;
    let initrd = guest_artifact("test-init.cpio").map_err(anyhow::Error::msg)?;
    let (v, p, k, i) = (vmm.display(), probe.display(), kernel.display(), initrd.display());
    let script = format!(
        r#"
D=/var/bench; mkdir -p $D; head -c 268435456 /dev/urandom > $D/big
{p} bench-native $D
S=/tmp/bench.sock
{p} sink ${{S}}_5001 &
{v} --kernel {k} --initramfs {i} --memory 512 --vsock $S --fs tag=bench,path=$D,cache=auto \
    --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet husk.test=bench" </dev/null 2>&1
"#
    );
    let mut job = Job::new(script)
        .timeout(Duration::from_secs(1800))
        .file(&vmm)
        .file(&probe)
        .file(&kernel)
        .file(&initrd);
    job.mem_mib = 3072;
    let out = run_job(&job)?;
    let host = values(&out.output, "HOST-BENCH ");
    let guest = values(&out.output, "GUEST-BENCH ");
    if out.output.contains("FAIL") || guest.len() < 3 || host.len() < 3 {
        anyhow::bail!("benchmark failed:\n{}", out.output);
    }
    let place = if out.l1.is_some() {
        "guest = L2 under KVM inside the nested test host (QEMU TCG, ~10x slower than native); host = L1"
    } else {
        "guest under this host's KVM; host = this host"
    };
    println!("Device benchmarks ({place})");
    for (g, h, what) in [
        ("vsock_g2h", "uds_pair", "vsock stream guest->host vs host Unix socket pair"),
        ("fs_seq_read", "fs_seq_read", "virtio-fs sequential read 256 MiB vs host read"),
        ("fs_metadata", "fs_metadata", "virtio-fs create+stat+unlink x10k vs host"),
    ] {
        let (gv, unit) = &guest[g];
        let (hv, _) = &host[h];
        println!("{what:<52} guest {gv:>10.1} {unit:<6} host {hv:>10.1} {unit:<6} ratio {:.3}", gv / hv);
    }
    Ok(())
}
