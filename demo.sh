#!/usr/bin/env bash
# The main job: `husk run` a busybox root file system in a fresh KVM microVM (husk-vmm, husk's
# guest kernel, husk-agent as the guest's PID 1, the rootfs over virtio-fs), run a workload in
# it, and come back with its exit code. The sandbox is on husk's default CNI network (a bridge
# on 10.77.0.0/16, written to /etc/husk/net.d on first use), so the guest has an address. On a
# host with hardware KVM it runs directly; here it runs inside the nested test host.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
./tests/build-artifacts.sh
t=$PWD/target
script='
# husk puts each VMM in a cgroup v2 of its own.
grep -q " /sys/fs/cgroup cgroup2 " /proc/mounts || mount -t cgroup2 cgroup2 /sys/fs/cgroup
r=/var/demo-rootfs
mkdir -p $r/bin $r/proc $r/sys $r/dev $r/tmp $r/etc
cp /bin/busybox $r/bin/busybox
for a in $($r/bin/busybox --list); do [ $a = busybox ] || ln -sf busybox $r/bin/$a; done
echo "root:x:0:0:root:/root:/bin/sh" > $r/etc/passwd
echo "$ husk run --rootfs $r -- sh -c ..."
time '"$t"'/release/husk run --rootfs $r --memory 256 -e WHO=husk -- sh -c "
    echo hello from a \$WHO sandbox: kernel \$(uname -r), \$(nproc) vCPU, hostname \$(hostname)
    echo processes in the container: && ps -o pid,args
    echo its network: \$(ip -4 -o addr show eth0 | tr -s \" \" | cut -d\" \" -f2,4)
    echo 6*7 = \$((6*7)); exit 42"
echo "husk run exit status $? (the workload exits 42)"
'
exec cargo run --release -q -p husk-tests --example testhost-run -- --net --cpus 2 --mem 2048 --timeout 600 "$script" \
    "$t/release/husk" "$t/release/husk-vmm" "$t/husk/vmlinux" "$t/husk/agent.cpio" /bin/busybox \
    /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/portmap /usr/sbin/iptables \
    /usr/lib/x86_64-linux-gnu/xtables
