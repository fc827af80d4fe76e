//! Networking end to end, in one test-host boot: `husk run` on its default CNI network (the
//! `10-husk.conflist` husk writes: bridge `husk0` on 10.77.0.0/16, host-local, portmap) and
//! podman 4.3 on its own default network with husk as its runtime. L1's side is
//! `husk-net-probe`; the guest serves busybox httpd, `husk-udp-echo`, and `husk-tcp-hello` for
//! the burst of connections (httpd's listen backlog of 9 would make that check time SYN
//! retransmits in the slow nested guest).
//!
//! Checked: published TCP and UDP ports on L1's 127.0.0.1 and the guest's CNI address, the
//! guest reaching L1, 64 MiB each way byte for byte, 100 concurrent connections, a sandbox
//! restored from a snapshot prepared for one NIC (`husk snapshot prepare --nics 1`) with the
//! pod's MAC in the guest, `--net none`
//! (loopback only), CNI DEL for a sandbox whose `husk run` was SIGKILLed (through `husk delete
//! --force`; that one boots cold), and after each part: no husk-vmm, tap, veth, network
//! namespace, host-local lease or iptables rule left. Everything stays inside L1: 10.77/16 and
//! podman's 10.88/16 exist only on L1's bridges, and L1 has no other interface.

use std::path::Path;
use std::time::Duration;

use husk_tests::artifacts::NetTestKit;
use husk_tests::{require, run_job, Job};

const SCRIPT: &str = r##"
H=@HUSK@
P=@PROBE@
BLOB=67108864
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "@@NO-CGROUP2"
# until_ok SECONDS CMD...: retries CMD every 0.2 s.
until_ok() { t=$1; shift; i=0; while ! "$@" >/dev/null 2>&1; do i=$((i+1)); [ $i -ge $((t*5)) ] && return 1; sleep 0.2; done; }
# alive PID: running (kill -0 also succeeds on a zombie not yet waited for).
alive() { [ -e /proc/$1 ] && ! grep -q ') Z' /proc/$1/stat 2>/dev/null; }
gone() { ! alive $1; }
# ready FILE PID SECONDS: waits for @@G-READY in FILE while PID lives.
ready() { i=0; while ! grep -q '^@@G-READY' $1; do alive $2 || return 1; i=$((i+1)); [ $i -ge $(($3*5)) ] && return 1; sleep 0.2; done; }
# stop PID NAME: kills the `husk run` sandbox's container from outside, as runtime.rs does, and
# prints husk run's exit code.
stop() {
    id=$($H list -q | grep '^run-' | head -n 1)
    if [ -n "$id" ]; then $H kill $id KILL; else echo "@@$2 FAIL no run- sandbox to kill: $($H list 2>&1 | tr '\n' ' ')"; fi
    until_ok 120 gone $1 || { echo "@@$2 FAIL husk run still running 120 s after its container was killed"; kill -9 $1; }
    wait $1; echo "@@$2-RC $?"
}
# The rules of L1's nat and filter tables, without counters, one "TOOL TABLE RULE" a line; the
# first line is never empty (busybox's grep -v -f with no patterns prints nothing).
ipt() {
    echo "tables:"
    for c in iptables ip6tables; do for t in nat filter; do
        $c-save -t $t 2>/dev/null | sed -e '/^#/d' -e '/^\*/d' -e '/^COMMIT$/d' -e 's/ \[[0-9]*:[0-9]*\]$//' -e "s/^/$c $t /"
    done; done | sort
}
# What the plugins create on first use and keep for every later sandbox (portmap's hostport
# chains, podman's firewall plugin chains): the same whatever sandbox came and went, and free of
# addresses and ports. Anything else added, and anything removed, is a leak.
SHARED='^ip6?tables (nat|filter) (:(PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) ACCEPT|:CNI-(HOSTPORT-(DNAT|SETMARK|MASQ)|FORWARD|ADMIN) -|-A (PREROUTING|OUTPUT) -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT|-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ|-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE|-A CNI-HOSTPORT-SETMARK -m comment --comment "CNI portfwd masquerade mark" -j MARK --set-xmark 0x2000/0x2000|-A FORWARD -m comment --comment "CNI firewall plugin rules" -j CNI-FORWARD|-A CNI-FORWARD -m comment --comment "CNI firewall plugin admin overrides" -j CNI-ADMIN)$'
leftovers() {
    # conmon exits on its own moments after `podman rm` returns: up to 10 s to go, then it is left.
    k=0
    while ps -o pid,args | grep -v grep | grep -qE 'husk-vmm|conmon' && [ $k -lt 20 ]; do sleep 0.5; k=$((k + 1)); done
    ps -o pid,args | grep -v grep | grep -qE 'husk-vmm|conmon' && { echo "@@LEFT-PROCESS $1"; ps -o pid,args | grep -E 'husk-vmm|conmon'; }
    ls /sys/class/net | grep -E '^(husk-tap|veth)' && { echo "@@LEFT-LINK $1"; ls /sys/class/net; }
    for d in /run/husk/netns /run/netns; do
        ls -A $d 2>/dev/null | grep -q . && { echo "@@LEFT-NETNS $1 $d"; ls -A $d; }
    done
    # Namespaces bound under the two directories (podman makes /run/netns a mount of its own).
    grep -E ' /run/(husk[/ ]|netns/)' /proc/mounts && echo "@@LEFT-MOUNT $1"
    find /run/husk/containers /run/husk/sandboxes /run/husk/runs -mindepth 1 2>/dev/null | grep -q . \
        && { echo "@@LEFT-STATE $1"; find /run/husk | head; }
    for d in /var/lib/cni/networks/*/; do
        [ -d "$d" ] && ls -A "$d" | grep -vE '^(last_reserved_ip.*|lock)$' | sed "s#^#$d#"
    done > /var/leases
    [ -s /var/leases ] && { echo "@@LEFT-LEASE $1"; cat /var/leases; }
    ipt > /var/ipt.after
    { grep -Fxv -f /var/ipt.before /var/ipt.after | grep -vE "$SHARED" | sed 's/^/added: /'
      grep -Fxv -f /var/ipt.after /var/ipt.before | sed 's/^/removed: /'; } > /var/ipt.diff
    [ -s /var/ipt.diff ] && { echo "@@LEFT-IPTABLES $1"; cat /var/ipt.diff; }
    echo "@@CLEAN-CHECKED $1"
}
mk_rootfs() {
    mkdir -p $1/bin $1/proc $1/sys $1/dev $1/tmp $1/etc $1/run $1/www
    cp @BUSYBOX@ $1/bin/busybox
    # Relative links: the rootfs is seen from inside the container.
    for a in $($1/bin/busybox --list); do [ $a = busybox ] || ln -sf busybox $1/bin/$a; done
    echo "root:x:0:0:root:/root:/bin/sh" > $1/etc/passwd
    echo "root:x:0:" > $1/etc/group
    cp @UDPECHO@ $1/bin/husk-udp-echo
    cp @TCPHELLO@ $1/bin/husk-tcp-hello
    echo hello-from-guest > $1/www/index.html
}
mk_rootfs /var/bb
# Part 1's guest: HTTP servers and a UDP echo server, its interfaces, then 64 MiB from L1 into /www (the
# overlay over the read-only rootfs is tmpfs-backed), hashed here and served back for L1 to hash:
# each direction is checked against L1's own sum, and nothing is generated or hashed twice in
# the slow nested guest.
cat > /var/bb/bin/net-guest <<'EOG'
#!/bin/sh
httpd -f -p 80 -h /www &
husk-udp-echo 5353 &
husk-tcp-hello 81 hello-from-guest &
echo "@@G-IFACES $(ls /sys/class/net | tr '\n' ' ')"
echo "@@G-MAC $(cat /sys/class/net/eth0/address)"
ip -o -4 addr show eth0 | sed 's/^/@@G-ADDR /'
ip route | sed 's/^/@@G-ROUTE /'
echo "@@G-HELLO $(wget -q -O - http://10.77.0.1:8089/hello 2>&1)"
wget -q -O /www/blob http://10.77.0.1:8089/blob; rc=$?
echo "@@G-GOT $(sha256sum < /www/blob) wget-rc=$rc"
echo "@@G-READY"
wait
EOG
chmod +x /var/bb/bin/net-guest
# Where the time goes (L1's uptime).
t() { echo "@@T $1 $(cut -d' ' -f1 /proc/uptime)"; }
# If a step stalls, the process list says where: on L1's console, whose tail a timeout reports
# (in the output it could land inside a section that a check reads whole).
( while sleep 120; do { echo "@@WATCH"; ps -o pid,ppid,stat,args | grep -v '\[' | cut -c1-160; } >/dev/console; done ) & watch=$!
ipt > /var/ipt.before
$P serve 0.0.0.0:8089 $BLOB > /var/serve.out 2>&1 &
until_ok 120 grep -q '^@@SERVE-READY' /var/serve.out || { echo "@@SERVE FAIL not ready:"; cat /var/serve.out; }
L1SUM=$(sed -n 's/^@@SERVE-READY sha256=//p' /var/serve.out)

echo "=== husk run"
# Snapshots for one pod interface made ahead of time: the run starts from one of them.
$H snapshot prepare --memory 512 --nics 1 > /var/prep.out 2>&1; echo "@@PREPARE-NICS-RC $?"
grep -c ', 1 NIC)' /var/prep.out | sed 's/^/@@PREPARED-NICS /'; cat /var/prep.out
$H snapshot ls | awk '$2 == "512M" { print $1 }' > /var/prepared.keys
t run
$H run --memory 512 -p 8080:80 -p 5353:5353/udp --rootfs /var/bb -- /bin/net-guest > /var/run1.out 2>&1 & run1=$!
ready /var/run1.out $run1 300 || echo "@@RUN1 FAIL the guest did not get ready"
t run-ready
sed 's/^/guest: /' /var/run1.out
conf=/etc/husk/net.d/10-husk.conflist
if grep -q husk0 $conf && grep -q 10.77.0.0/16 $conf && grep -q portmap $conf; then echo "@@CONFLIST ok"
else echo "@@CONFLIST FAIL $(ls /etc/husk/net.d 2>&1) $(cat $conf 2>&1 | tr '\n' ' ')"; fi
gaddr=$(sed -n 's#^@@G-ADDR .* inet \(10\.77\.[0-9]*\.[0-9]*\)/.*#\1#p' /var/run1.out | head -n 1)
if [ -n "$gaddr" ]; then echo "@@GUEST-ADDR ok $gaddr"
else echo "@@GUEST-ADDR FAIL eth0 has no 10.77 address: $(grep -E '^@@G-(IFACES|ADDR)' /var/run1.out | tr '\n' ' ')"; fi
if grep -q '^@@G-HELLO hello-from-l1' /var/run1.out; then echo "@@GUEST-TO-L1 ok"
else echo "@@GUEST-TO-L1 FAIL $(grep -E '^@@G-(HELLO|ROUTE)' /var/run1.out | tr '\n' ' ')"; fi
got=$(sed -n 's/^@@G-GOT \([0-9a-f]*\) .*/\1/p' /var/run1.out)
if [ -n "$L1SUM" ] && [ "$got" = "$L1SUM" ]; then echo "@@L1-TO-GUEST-64M ok"
else echo "@@L1-TO-GUEST-64M FAIL the guest got sha256 $(grep '^@@G-GOT' /var/run1.out), L1 served $L1SUM"; fi
$P get PUBLISHED-TCP 127.0.0.1:8080 /index.html --contains hello-from-guest --wait 30
$P get GUEST-TCP ${gaddr:-10.77.255.254}:80 /index.html --contains hello-from-guest --wait 30
t fetch-64m
$P get GUEST-TO-L1-64M ${gaddr:-10.77.255.254}:80 /blob --len $BLOB --sha256 ${L1SUM:-none}
t conns
$P conns CONNS-100 ${gaddr:-10.77.255.254}:81 100 /index.html hello-from-guest
t udp
$P udp PUBLISHED-UDP 127.0.0.1:5353 50 --wait 30
$P udp GUEST-UDP ${gaddr:-10.77.255.254}:5353 50 --wait 30
# What the cleanup checks look for is there while the sandbox runs (so they cannot pass for
# want of seeing it): the port map's DNAT rule, a veth, husk's namespace, a lease.
seen=$(ipt | grep -c "DNAT --to-destination ${gaddr:-none}:80")/$(ls /sys/class/net | grep -c '^veth')
seen=$seen/$(ls /run/husk/netns | grep -c .)/$(ls /var/lib/cni/networks/*/ | grep -c "^${gaddr:-none}$")
if [ "$seen" = 1/1/1/1 ]; then echo "@@RUN-STATE-VISIBLE ok"
else echo "@@RUN-STATE-VISIBLE FAIL DNAT rules/veths/husk netns/leases: $seen"; ipt | grep -v ' :'; fi
# The sandbox started from a prepared snapshot for one pod interface (it made none of its own),
# and the guest's link has the pod interface's MAC, not the snapshot's placeholder.
nics=$($H snapshot ls | awk '$2 == "512M" { print $5 }' | tr '\n' ' ')
if [ "$nics" = "1 1 " ] && $H snapshot ls | awk '$2 == "512M" { print $1 }' | cmp -s - /var/prepared.keys
then echo "@@NET-SNAPSHOT ok"; else echo "@@NET-SNAPSHOT FAIL 512M snapshots' NICS: '$nics'"; $H snapshot ls; cat /var/prepared.keys; fi
podmac=$(nsenter --net=/run/husk/netns/$(ls /run/husk/netns | head -n 1) ip -o link show eth0 | sed -n 's#.*link/ether \([0-9a-f:]*\) .*#\1#p')
gmac=$(sed -n 's/^@@G-MAC //p' /var/run1.out)
if [ -n "$podmac" ] && [ "$gmac" = "$podmac" ]; then echo "@@POD-MAC ok"; else echo "@@POD-MAC FAIL guest $gmac, pod $podmac"; fi
t stop
stop $run1 RUN1
t stopped
leftovers run

echo "=== net none"
t none
# sit0 is not a way out: the fallback SIT tunnel a kernel with IPv6 SIT built in puts in every
# network namespace (down, no address); every address but loopback's is listed.
$H run --net none --rootfs /var/bb -- sh -c 'echo "@@NONE-IFACES $(ls /sys/class/net | grep -vx sit0 | tr "\n" " ")"
    echo "@@NONE-ADDRS $(ip -o addr | grep inet | grep -v " lo " | tr "\n" " ")"'; echo "@@NONE-RC $?"
leftovers none

echo "=== crash"
t crash
# Booted cold: a networked guest whose devices have the pod's MACs from the start.
$H --no-snapshot run --rootfs /var/bb -- sh -c 'ip -o -4 addr show eth0; echo "@@G-READY"; exec sleep 600' > /var/crash.out 2>&1 & cr=$!
ready /var/crash.out $cr 180 || { echo "@@CRASH FAIL the guest did not get ready:"; cat /var/crash.out; }
ls /var/lib/cni/networks/*/ | grep -q '^10\.77\.' && echo "@@CRASH-LEASE-HELD"
t crash-ready
kill -9 $cr; wait $cr; echo "@@CRASH-HUSK-KILLED $?"
ps -o args | grep -v grep | grep -q husk-vmm && echo "@@CRASH-VMM-ALIVE"
$H list
id=$($H list -q | grep '^run-')
if [ -n "$id" ]; then echo "@@CRASH-LISTED ok $id"; else echo "@@CRASH-LISTED FAIL no run- sandbox in husk list"; fi
$H delete --force $id; echo "@@CRASH-DELETE-RC $?"
leftovers crash

echo "=== podman"
t podman
PM="podman --root /var/pm/root --runroot /run/pm --runtime $H --cgroup-manager cgroupfs --events-backend file --storage-driver vfs"
echo "@@PODMAN-BACKEND $($PM info --format '{{.Host.NetworkBackend}}' 2>&1)"
$PM run -d --name pn -p 8081:80 --rootfs /var/bb httpd -f -p 80 -h /www >/dev/null; echo "@@PODMAN-RUN-RC $?"
paddr=$($PM inspect -f '{{.NetworkSettings.IPAddress}}' pn)
echo "podman container address: $paddr"
$P get PODMAN-PUBLISHED 127.0.0.1:8081 /index.html --contains hello-from-guest --wait 60
$P get PODMAN-ADDR ${paddr:-10.88.255.254}:80 /index.html --contains hello-from-guest --wait 60
out=$($PM exec pn sh -c "ip -o -4 addr show eth0; wget -q -O - http://10.88.0.1:8089/hello" 2>&1)
if echo "$out" | grep -q "inet $paddr/" && echo "$out" | grep -q hello-from-l1; then echo "@@PODMAN-GUEST ok"
else echo "@@PODMAN-GUEST FAIL address $paddr, in the guest: $(echo "$out" | tr '\n' ' ')"; fi
seen=$(ipt | grep -c "DNAT --to-destination ${paddr:-none}:80")/$(ls /run/netns | grep -c .)
if [ "$seen" = 1/1 ]; then echo "@@PODMAN-STATE-VISIBLE ok"; else echo "@@PODMAN-STATE-VISIBLE FAIL DNAT rules/netns: $seen"; fi
t podman-rm
$PM rm -f -t 0 pn >/dev/null; echo "@@PODMAN-RM-RC $?"
leftovers podman
t end
kill $watch
"##;

#[test]
fn husk_run_and_podman_on_cni_networks() {
    let kit = require!(NetTestKit::find());
    let d = |p: &Path| p.display().to_string();
    let script = SCRIPT
        .replace("@HUSK@", &d(&kit.runtime.husk))
        .replace("@PROBE@", &d(&kit.probe))
        .replace("@BUSYBOX@", &d(&kit.runtime.busybox))
        .replace("@UDPECHO@", &d(&kit.udp_echo))
        .replace("@TCPHELLO@", &d(&kit.tcp_hello));
    let mut job = Job::new(script).timeout(Duration::from_secs(1200));
    job.files = kit.files();
    job.net = true;
    // One L1 CPU and its watchdog, as in the runtime and CRI tests (the nested test host is
    // steadier with one; silence past stall_after is a stalled L1, run once more).
    job.cpus = 1;
    job.mem_mib = 3072;
    job.stall_after = Some(Duration::from_secs(300));
    let out = run_job(&job).unwrap_or_else(|e| panic!("test host failed: {e}"));
    let o = out.output;
    eprintln!("test host: {:?}\n{o}", out.elapsed);
    assert!(!o.contains("@@NO-CGROUP2"), "{o}");
    let failed: Vec<&str> = o.lines().filter(|l| l.starts_with("@@") && l.contains(" FAIL")).collect();
    assert!(failed.is_empty(), "network checks failed:\n{}\n\n{o}", failed.join("\n"));
    let left: Vec<&str> = o.lines().filter(|l| l.starts_with("@@LEFT-")).collect();
    assert!(left.is_empty(), "left behind:\n{}\n\n{o}", left.join("\n"));
    for check in [
        // husk run on the default network.
        "@@CONFLIST ok",
        "@@GUEST-ADDR ok 10.77.",
        "@@GUEST-TO-L1 ok",
        "@@L1-TO-GUEST-64M ok",
        "@@PUBLISHED-TCP ok",
        "@@GUEST-TCP ok",
        "@@GUEST-TO-L1-64M ok len=67108864",
        "@@CONNS-100 ok",
        "@@PUBLISHED-UDP ok",
        "@@GUEST-UDP ok",
        // Killed from outside by `husk kill`: 128 + SIGKILL.
        "@@RUN-STATE-VISIBLE ok",
        // Restored from a snapshot with one (detached) NIC, given the pod's MAC by the agent.
        "@@PREPARE-NICS-RC 0",
        // One for OCI containers, one for `husk run`.
        "@@PREPARED-NICS 2",
        "@@NET-SNAPSHOT ok",
        "@@POD-MAC ok",
        "@@RUN1-RC 137",
        "@@CLEAN-CHECKED run",
        // --net none: loopback only.
        "@@NONE-IFACES lo \n@@NONE-ADDRS \n@@NONE-RC 0",
        "@@CLEAN-CHECKED none",
        // husk run SIGKILLed with its VM still up: the sandbox is listed and deleted with CNI DEL.
        "@@CRASH-LEASE-HELD",
        "@@CRASH-HUSK-KILLED 137",
        "@@CRASH-VMM-ALIVE",
        "@@CRASH-LISTED ok run-",
        "@@CRASH-DELETE-RC 0",
        "@@CLEAN-CHECKED crash",
        // podman on its default network (CNI on Debian bookworm).
        "@@PODMAN-RUN-RC 0",
        "@@PODMAN-PUBLISHED ok",
        "@@PODMAN-ADDR ok",
        "@@PODMAN-GUEST ok",
        "@@PODMAN-STATE-VISIBLE ok",
        "@@PODMAN-RM-RC 0",
        "@@CLEAN-CHECKED podman",
    ] {
        assert!(o.contains(check), "expected {check:?}:\n{o}");
    }
}
