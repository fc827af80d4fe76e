//! virtio-net end to end, in one test-host boot: husk-vmm with `--net tap=...` on a tap it
//! creates in L1, Linux's virtio-net driver in the L2 guest (busybox as init), and traffic both
//! ways on a private /24 that exists only between L1 and that guest: 16 MiB each way over TCP
//! (checksummed; with the offloads and mergeable buffers the driver negotiates), the MTU and MAC
//! from the config, and no tap left after the VMM exits.

use std::time::Duration;

use husk_tests::artifacts::{bin, guest_artifact};
use husk_tests::initramfs::Initramfs;
use husk_tests::{require, run_job, unavailable_reason, Job};

const L1_ADDR: &str = "10.213.8.1";
const GUEST_ADDR: &str = "10.213.8.2";
const MAC: &str = "02:00:0a:d5:08:02";

/// The guest's /init: configure eth0 from the command line's addresses, fetch L1's blob,
/// then serve it back and wait to be killed.
const GUEST_INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /www; mount -t tmpfs tmpfs /www
echo "GUEST mac $(cat /sys/class/net/eth0/address) mtu $(cat /sys/class/net/eth0/mtu)"
ip link set lo up; ip link set eth0 up; ip addr add @GUEST@/24 dev eth0
echo pong > /www/ping
i=0; until wget -q -O /www/blob http://@L1@:8080/blob; do i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.2; done
echo "GUEST got $(md5sum < /www/blob)"
httpd -p 80 -h /www
echo "GUEST serving"
while :; do sleep 60; done
"#;

#[test]
fn virtio_net_carries_tcp_both_ways_through_a_tap() {
    require!(unavailable_reason().map_or(Ok(()), Err));
    let vmm = require!(bin("husk-vmm"));
    let kernel = require!(guest_artifact("vmlinux"));
    let dir = std::env::temp_dir().join(format!("husk-net-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let initrd = dir.join("net-init.cpio");
    let mut fs = Initramfs::with_base_layout().expect("initramfs");
    fs.data("init", 0o755, GUEST_INIT.replace("@GUEST@", GUEST_ADDR).replace("@L1@", L1_ADDR)).expect("init");
    fs.add_busybox().expect("busybox");
    fs.write(&initrd).expect("write initramfs");

    let (v, k, i) = (vmm.display(), kernel.display(), initrd.display());
    let script = format!(
        r#"
mkdir -p /srv/www; dd if=/dev/urandom of=/srv/www/blob bs=1M count=16 2>/dev/null
echo "L1 blob $(md5sum < /srv/www/blob)"
{v} --kernel {k} --initramfs {i} --memory 256 --net tap=husk-t0,mac={MAC},mtu=1400 \
    --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet" </dev/null >/tmp/vm.out 2>&1 &
vm=$!
i=0; until [ -e /sys/class/net/husk-t0 ]; do i=$((i+1)); [ $i -gt 300 ] && break; sleep 0.1; done
ip addr add {L1_ADDR}/24 dev husk-t0 && ip link set husk-t0 up && echo "@@TAP-UP"
busybox httpd -p {L1_ADDR}:8080 -h /srv/www
i=0; until wget -q -O /tmp/ping http://{GUEST_ADDR}/ping 2>/dev/null; do i=$((i+1)); [ $i -gt 600 ] && break; sleep 0.5; done
echo "@@PING $(cat /tmp/ping 2>/dev/null)"
t0=$(cut -d' ' -f1 /proc/uptime)
wget -q -O /tmp/back http://{GUEST_ADDR}/blob
t1=$(cut -d' ' -f1 /proc/uptime)
echo "L1 back $(md5sum < /tmp/back)"
echo "@@GUEST-TO-L1 16MiB in $t0..$t1 s"
kill $vm; wait $vm
sed 's/^/vm: /' /tmp/vm.out | grep GUEST
cat /tmp/vm.out | tail -n 5
[ -e /sys/class/net/husk-t0 ] && echo "@@TAP-LEFT"
echo "@@DONE"
"#
    );
    let mut job = Job::new(script).timeout(Duration::from_secs(900));
    job.files.extend([vmm.clone(), kernel.clone(), initrd.clone()]);
    job.net = true;
    let out = run_job(&job).unwrap_or_else(|e| panic!("test host failed: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    let o = &out.output;
    eprintln!("test host: {:?}\n{o}", out.elapsed);
    let md5 = |prefix: &str| {
        o.lines().find_map(|l| {
            l.split_once(prefix).map(|(_, r)| r.split_whitespace().next().unwrap_or("").to_string())
        })
    };
    assert!(o.contains("@@TAP-UP"), "the tap husk-vmm made was not there:\n{o}");
    assert!(o.contains(&format!("GUEST mac {MAC} mtu 1400")), "MAC and MTU from the config:\n{o}");
    assert!(o.contains("@@PING pong"), "L1 reached the guest's httpd:\n{o}");
    let sent = md5("L1 blob ").expect("L1's checksum");
    assert_eq!(md5("GUEST got ").as_deref(), Some(sent.as_str()), "L1 → guest, 16 MiB:\n{o}");
    assert_eq!(md5("L1 back ").as_deref(), Some(sent.as_str()), "guest → L1, 16 MiB:\n{o}");
    assert!(!o.contains("@@TAP-LEFT"), "the tap outlived its VMM:\n{o}");
    assert!(o.contains("@@DONE"), "{o}");
}
