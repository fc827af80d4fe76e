//! virtio-net against a veth pair, in one test-host run: TCP stream (64 MiB over HTTP) each way
//! and a request/response rate (sequential small HTTP GETs), between L1 and a husk-vmm guest on
//! a tap, and between L1 and a network namespace on a veth pair (what a runc pod gets). Run via
//! bench/net.sh; prints the ratios.

use std::collections::BTreeMap;
use std::time::Duration;

use husk_tests::artifacts::{bin, guest_artifact};
use husk_tests::initramfs::Initramfs;
use husk_tests::{run_job, Job};

const GUEST_INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /www; mount -t tmpfs tmpfs /www
ip link set lo up; ip link set eth0 up; ip addr add 10.213.9.2/24 dev eth0
head -c 67108864 /dev/urandom > /www/blob; echo ok > /www/small
httpd -p 80 -h /www
up() { cut -d' ' -f1 /proc/uptime; }
i=0; until wget -q -O /dev/null http://10.213.9.1:8080/small; do i=$((i+1)); [ $i -gt 300 ] && break; sleep 0.2; done
t0=$(up); wget -q -O /www/in http://10.213.9.1:8080/blob; t1=$(up)
[ "$(wc -c < /www/in | tr -d ' ')" = 67108864 ] && echo "BENCH-T vm_in $t0 $t1"; rm -f /www/in
echo "GUEST-DONE"
while :; do sleep 60; done
"#;

/// `BENCH-T name t0 t1` lines → seconds.
fn times(output: &str) -> BTreeMap<String, f64> {
    output
        .lines()
        .filter_map(|l| l.split_once("BENCH-T ").map(|(_, r)| r))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, t0, t1) = (f.next()?, f.next()?.parse::<f64>().ok()?, f.next()?.parse::<f64>().ok()?);
            Some((name.to_string(), (t1 - t0).max(0.01)))
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let vmm = bin("husk-vmm").map_err(anyhow::Error::msg)?;
    let kernel = guest_artifact("vmlinux").map_err(anyhow::Error::msg)?;
    let dir = std::env::temp_dir().join(format!("husk-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("init.cpio");
    let mut fs = Initramfs::with_base_layout()?;
    fs.data("init", 0o755, GUEST_INIT)?;
    fs.add_busybox()?;
    fs.write(&initrd)?;
    let (v, k, i) = (vmm.display(), kernel.display(), initrd.display());
    let rr = 200;
    let script = format!(
        r#"
up() {{ cut -d' ' -f1 /proc/uptime; }}
mkdir -p /srv/www; head -c 67108864 /dev/urandom > /srv/www/blob; echo ok > /srv/www/small
# The peer: a netns on a veth pair, as runc pods get (iproute2's ip, not busybox's).
IP=/usr/bin/ip
$IP netns add b1 && $IP link add va type veth peer name vb netns b1
$IP addr add 10.213.10.1/24 dev va && $IP link set va up
$IP -n b1 addr add 10.213.10.2/24 dev vb; $IP -n b1 link set vb up; $IP -n b1 link set lo up
B1="nsenter --net=/run/netns/b1"
busybox httpd -p 10.213.10.1:8081 -h /srv/www
$B1 busybox httpd -p 10.213.10.2:80 -h /srv/www
sleep 1
# size FILE: a transfer counts only when every byte arrived.
size() {{ wc -c < $1 | tr -d ' '; }}
t0=$(up); wget -q -O /tmp/o http://10.213.10.2/blob; t1=$(up); [ "$(size /tmp/o)" = 67108864 ] && echo "BENCH-T veth_out $t0 $t1"
t0=$(up); $B1 busybox wget -q -O /tmp/i http://10.213.10.1:8081/blob; t1=$(up); [ "$(size /tmp/i)" = 67108864 ] && echo "BENCH-T veth_in $t0 $t1"
rm -f /tmp/o /tmp/i
t0=$(up); n=0; ok=0; while [ $n -lt {rr} ]; do wget -q -O /tmp/s http://10.213.10.2/small && ok=$((ok+1)); n=$((n+1)); done; t1=$(up); [ $ok = {rr} ] && echo "BENCH-T veth_rr $t0 $t1"
# The guest on a tap.
{v} --kernel {k} --initramfs {i} --memory 512 --net tap=husk-b0 \
    --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet" </dev/null >/tmp/vm.out 2>&1 &
vm=$!
n=0; until [ -e /sys/class/net/husk-b0 ]; do n=$((n+1)); [ $n -gt 300 ] && break; sleep 0.1; done
$IP addr add 10.213.9.1/24 dev husk-b0; $IP link set husk-b0 up
busybox httpd -p 10.213.9.1:8080 -h /srv/www
n=0; until grep -q GUEST-DONE /tmp/vm.out; do n=$((n+1)); [ $n -gt 1200 ] && break; sleep 0.5; done
t0=$(up); wget -q -O /tmp/o http://10.213.9.2/blob; t1=$(up); [ "$(size /tmp/o)" = 67108864 ] && echo "BENCH-T vm_out $t0 $t1"
rm -f /tmp/o
t0=$(up); n=0; ok=0; while [ $n -lt {rr} ]; do wget -q -O /tmp/s http://10.213.9.2/small && ok=$((ok+1)); n=$((n+1)); done; t1=$(up); [ $ok = {rr} ] && echo "BENCH-T vm_rr $t0 $t1"
cat /tmp/vm.out
kill $vm; wait $vm
"#
    );
    let mut job = Job::new(script).timeout(Duration::from_secs(1800)).file(&vmm).file(&kernel).file(&initrd);
    job = job.file("/usr/bin/ip");
    job.net = true;
    job.mem_mib = 3072;
    let out = run_job(&job)?;
    let _ = std::fs::remove_dir_all(&dir);
    let t = times(&out.output);
    let need = ["veth_out", "veth_in", "veth_rr", "vm_out", "vm_in", "vm_rr"];
    if need.iter().any(|n| !t.contains_key(*n)) {
        anyhow::bail!("benchmark failed:\n{}", out.output);
    }
    let place = if out.l1.is_some() {
        "guest = L2 under KVM inside the nested test host (QEMU TCG, ~10x slower than native); peer = a netns on a veth pair in L1"
    } else {
        "guest under this host's KVM; peer = a netns on a veth pair"
    };
    let mbit = |secs: f64| 64.0 * 8.0 * 1.048_576 / secs;
    println!("virtio-net benchmarks ({place})");
    for (vm, veth, what) in [
        ("vm_out", "veth_out", "TCP stream guest->L1 (64 MiB), Mbit/s"),
        ("vm_in", "veth_in", "TCP stream L1->guest (64 MiB), Mbit/s"),
    ] {
        let (a, b) = (mbit(t[vm]), mbit(t[veth]));
        println!("{what:<44} virtio-net {a:>9.1}  veth {b:>9.1}  ratio {:.3}", a / b);
    }
    let (a, b) = (f64::from(rr) / t["vm_rr"], f64::from(rr) / t["veth_rr"]);
    println!(
        "{:<44} virtio-net {a:>9.1}  veth {b:>9.1}  ratio {:.3}",
        "HTTP request/response rate, req/s",
        a / b
    );
    Ok(())
}
