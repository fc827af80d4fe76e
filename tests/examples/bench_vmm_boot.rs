//! Boot benchmark: husk-vmm against `qemu-system-x86_64 -M microvm`, same kernel, initramfs,
//! memory and command line, alternating runs in one test-host session. Prints the median
//! time-to-marker of each, their ratio, and memory: peak RSS and VMM overhead (RSS minus the
//! guest memory touched), and what confinement costs at start: husk-vmm unconfined
//! (`--no-seccomp`, no jail) against husk-vmm as husk runs it (its seccomp filters and
//! `--jail`). Run it through `bench/vmm-boot.sh`.

use std::time::Duration;

use husk_tests::artifacts::{bin, guest_artifact};
use husk_tests::{run_job, Job};

const MARKER: &str = "HUSK-TEST-INIT-READY";
const MEM_MIB: u64 = 128;

#[derive(Debug, Default, Clone)]
struct Run {
    marker_ms: f64,
    exit: i64,
    rss_kib: u64,
    guest_rss_kib: u64,
    peak_rss_kib: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() -> anyhow::Result<()> {
    let runs: u32 = std::env::var("HUSK_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let vmm = bin("husk-vmm").map_err(anyhow::Error::msg)?;
    let bench = bin("husk-bootbench").map_err(anyhow::Error::msg)?;
    let kernel = guest_artifact("vmlinux").map_err(anyhow::Error::msg)?;
    let initrd = guest_artifact("test-init.cpio").map_err(anyhow::Error::msg)?;
    let (v, b, k, i) = (vmm.display(), bench.display(), kernel.display(), initrd.display());
    let cmdline = "console=ttyS0 reboot=k panic=-1 pci=off quiet husk.test=poweroff";
    let script = format!(
        r#"
common="--marker {MARKER} --guest-mem-mib {MEM_MIB} --runs 1"
husk() {{ {b} --name husk $common -- {v} --no-seccomp --kernel {k} --initramfs {i} --memory {MEM_MIB} --cmdline "{cmdline}"; }}
huskc() {{ j=$(mktemp -d); {b} --name husk-confined $common -- {v} --jail $j --kernel {k} --initramfs {i} --memory {MEM_MIB} --cmdline "{cmdline}"; rmdir $j; }}
qemu() {{ {b} --name qemu $common -- qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,pit=off,pic=off,isa-serial=on \
    -enable-kvm -cpu host -m {MEM_MIB} -smp 1 -nodefaults -no-user-config -nographic -no-reboot \
    -serial stdio -device virtio-rng-device -kernel {k} -initrd {i} -append "{cmdline}"; }}
husk >/dev/null; huskc >/dev/null; qemu >/dev/null   # warm caches
for r in $(seq {runs}); do husk; huskc; qemu; done
"#
    );
    let job = Job::new(script)
        .timeout(Duration::from_secs(1800))
        .file(&vmm)
        .file(&bench)
        .file(&kernel)
        .file(&initrd);
    let job = job.with_qemu()?;
    let out = run_job(&job)?;
    if out.exit_code != 0 {
        anyhow::bail!("benchmark script failed ({}):\n{}\n{}", out.exit_code, out.output, out.console);
    }
    let mut husk = Vec::new();
    let mut confined = Vec::new();
    let mut qemu = Vec::new();
    for line in out.output.lines().filter(|l| l.starts_with('{')) {
        let j: serde_json::Value = serde_json::from_str(line)?;
        let r = Run {
            marker_ms: j["marker_ms"].as_f64().unwrap_or(f64::NAN),
            exit: j["exit"].as_i64().unwrap_or(-1),
            rss_kib: j["rss_kib"].as_u64().unwrap_or(0),
            guest_rss_kib: j["guest_rss_kib"].as_u64().unwrap_or(0),
            peak_rss_kib: j["peak_rss_kib"].as_u64().unwrap_or(0),
        };
        match j["vmm"].as_str() {
            Some("husk") => husk.push(r),
            Some("husk-confined") => confined.push(r),
            Some("qemu") => qemu.push(r),
            _ => {}
        }
    }
    for (name, rs) in [("husk-vmm", &husk), ("husk-vmm confined", &confined), ("qemu microvm", &qemu)] {
        if rs.is_empty() || rs.iter().any(|r| r.exit != 0 || r.marker_ms.is_nan()) {
            anyhow::bail!("{name}: some runs failed: {rs:?}\n{}", out.output);
        }
    }
    let summary = |rs: &[Run]| {
        let t = median(rs.iter().map(|r| r.marker_ms).collect());
        let peak = median(rs.iter().map(|r| r.peak_rss_kib as f64).collect()) / 1024.0;
        let over =
            median(rs.iter().map(|r| r.rss_kib.saturating_sub(r.guest_rss_kib) as f64).collect()) / 1024.0;
        let guest = median(rs.iter().map(|r| r.guest_rss_kib as f64).collect()) / 1024.0;
        (t, peak, over, guest)
    };
    let (ht, hpeak, hover, hguest) = summary(&husk);
    let (qt, qpeak, qover, qguest) = summary(&qemu);
    let (ct, cpeak, cover, cguest) = summary(&confined);
    let where_ = match out.l1 {
        Some(_) => "inside the nested test host (L2 under QEMU TCG; ~10x slower than native)",
        None => "directly on this host's KVM",
    };
    println!("VMM boot benchmark: {runs} alternating runs each, {MEM_MIB} MiB guest, measured {where_}");
    println!(
        "{:<14} {:>16} {:>14} {:>20} {:>18}",
        "", "time-to-marker", "peak RSS", "VMM overhead RSS", "guest touched"
    );
    for (n, t, p, o, g) in [
        ("husk-vmm", ht, hpeak, hover, hguest),
        ("  confined", ct, cpeak, cover, cguest),
        ("qemu microvm", qt, qpeak, qover, qguest),
    ] {
        println!("{n:<14} {t:>13.1} ms {p:>10.1} MiB {o:>16.1} MiB {g:>14.1} MiB");
    }
    println!(
        "ratio time-to-marker confined/unconfined husk-vmm: {:.3} (target <= 1.05; seccomp filters + jail)",
        ct / ht
    );
    println!("ratio time-to-marker qemu/husk: {:.2}x (>1 means husk-vmm boots faster)", qt / ht);
    println!(
        "ratio VMM overhead RSS qemu/husk: {:.2}x; husk-vmm overhead {hover:.1} MiB (target <= 4 MiB)",
        qover / hover
    );
    Ok(())
}
