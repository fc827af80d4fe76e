//! The `husk` runtime end to end, in one test-host boot: `husk run` (rootfs, OCI image layout,
//! a pty), the runc-compatible CLI driven directly (lifecycle, bad input, a VMM killed under a
//! running container), then real clients: containerd 1.6 with `ctr --runc-binary husk`, and
//! podman 4.3 + conmon with `--runtime husk`. After each part nothing may be left: no husk-vmm,
//! no mount under the state directories, no state.

use std::path::Path;
use std::time::Duration;

use husk_tests::artifacts::{guest_bin, RuntimeTestKit};
use husk_tests::{require, run_job, Job};

const SCRIPT: &str = r##"
H=@HUSK@
R=/run/husk-oci
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "@@NO-CGROUP2"
mk_rootfs() {
    mkdir -p $1/bin $1/proc $1/sys $1/dev $1/tmp $1/etc $1/run
    cp @BUSYBOX@ $1/bin/busybox
    # Relative links: the rootfs is seen from inside the container.
    for a in $($1/bin/busybox --list); do [ $a = busybox ] || ln -sf busybox $1/bin/$a; done
    echo "root:x:0:0:root:/root:/bin/sh" > $1/etc/passwd
    echo "root:x:0:" > $1/etc/group
}
# bundle DIR ARGS-JSON [TERMINAL] [ANNOTATIONS-JSON] [IPC-NAMESPACE-JSON]: a runc-spec-like
# config.json over /var/bb.
bundle() {
    mkdir -p $1
    ann=${4:-'{}'}
    ns=${5:-'{"type":"ipc"},{"type":"network"}'}
    cat > $1/config.json <<EOC
{"ociVersion":"1.0.2","annotations":$ann,
 "process":{"terminal":${3:-false},"user":{"uid":0,"gid":0},"args":$2,"env":["PATH=/bin"],"cwd":"/",
   "capabilities":{"bounding":["CAP_KILL","CAP_CHOWN"],"effective":["CAP_KILL","CAP_CHOWN"],"permitted":["CAP_KILL","CAP_CHOWN"]},
   "noNewPrivileges":true},
 "root":{"path":"/var/bb","readonly":false},
 "hostname":"oci",
 "mounts":[{"destination":"/proc","type":"proc","source":"proc"},
           {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","mode=755"]},
           {"destination":"/tmp","type":"tmpfs","source":"tmpfs","options":["nosuid","nodev"]},
           {"destination":"/mnt","type":"bind","source":"/var/vol","options":["rbind","ro"]}],
 "linux":{"namespaces":[{"type":"pid"},{"type":"uts"},{"type":"mount"},$ns],
   "resources":{"memory":{"limit":67108864},"pids":{"limit":100}}}}
EOC
}
# until SECONDS CMD...: retries CMD every 0.2 s.
until_ok() { t=$1; shift; i=0; while ! "$@" >/dev/null 2>&1; do i=$((i+1)); [ $i -ge $((t*5)) ] && return 1; sleep 0.2; done; }
leftovers() {
    ps -o pid,args | grep -v grep | grep -q 'husk-vmm' && { echo "@@LEFT-VMM $1"; ps -o pid,args | grep husk-vmm; }
    grep -E ' /run/(husk|husk-oci|containerd/runc)' /proc/mounts && echo "@@LEFT-MOUNT $1"
    for d in /run/husk /run/husk-oci /run/containerd/runc/default /run/husk/containerd/default; do
        find $d/containers $d/sandboxes $d/runs -mindepth 1 2>/dev/null | grep -q . && { echo "@@LEFT-STATE $1 $d"; find $d | head; }
    done
    # No process is left in a sandbox's cgroup when husk returns. The cgroup itself goes a
    # moment later: KVM's kernel threads for the VM stay in it until the kernel has destroyed
    # the VM, which husk leaves to a detached process that then removes the cgroup.
    for c in /sys/fs/cgroup/husk/*/; do
        [ -e "${c}cgroup.procs" ] || continue
        for p in $(cat ${c}cgroup.procs); do
            [ -s /proc/$p/cmdline ] && { echo "@@LEFT-CGROUP-PROCESS $1 $c $p"; cat /proc/$p/cmdline | tr '\0' ' '; echo; }
        done
    done
    until_ok 10 sh -c '! find /sys/fs/cgroup/husk -mindepth 1 -maxdepth 1 -type d | grep -q .' \
        || { echo "@@LEFT-CGROUP $1"; ls /sys/fs/cgroup/husk; }
    echo "@@CLEAN-CHECKED $1"
}
# confined PID: how the VMM with that pid is confined, as @@CF- lines.
confined() {
    for t in /proc/$1/task/*; do
        c=$(cat $t/comm)
        # KVM's own kernel worker threads are listed with the process but run no user code.
        case $c in kvm-*) continue;; esac
        grep -q '^Seccomp:[[:space:]]*2' $t/status || echo "@@CF-NO-SECCOMP $c"
        grep -q '^NoNewPrivs:[[:space:]]*1' $t/status || echo "@@CF-NO-NNP $c"
        echo "@@CF-THREAD $c $(grep CapEff $t/status | tr -d '\t ')"
    done
    echo "@@CF-ROOT $(ls /proc/$1/root | tr '\n' ' ')"
    for ns in pid mnt ipc uts; do
        [ "$(readlink /proc/$1/ns/$ns)" = "$(readlink /proc/self/ns/$ns)" ] && echo "@@CF-SAME-NS $ns"
    done
    cg=$(cut -d: -f3 /proc/$1/cgroup)
    echo "@@CF-CGROUP $cg mem=$(cat /sys/fs/cgroup$cg/memory.max) pids=$(cat /sys/fs/cgroup$cg/pids.max) procs=$(cat /sys/fs/cgroup$cg/cgroup.procs | tr '\n' ' ')"
    echo "@@CF-NOFILE $(grep 'Max open files' /proc/$1/limits | awk '{print $4}')"
    echo "@@CF-FDS $(ls /proc/$1/fd | wc -l)"
    # Mounts the host made read-only after boot are read-only in the VMM's namespace too.
    awk '$5 ~ /^\/shares\/0\/.*\/mounts\// {print "@@CF-SHARE-MOUNT", $5, $6}' /proc/$1/mountinfo
}
mk_rootfs /var/bb
# `husk run` here is on no network (no CNI plugins in this test host): tests/network.rs has that.
mkdir -p /var/vol && echo vol-data > /var/vol/f
# If a step stalls, the process list says where: on L1's console, whose tail a timeout reports
# (in the output it could land inside a section that a check reads whole).
( while sleep 120; do { echo "@@WATCH"; ps -o pid,ppid,stat,args | grep -v '\[' | cut -c1-160; } >/dev/console; done ) & watch=$!

echo "=== husk run"
# Cold, with every phase timed; then the first ordinary run makes the shape's snapshot and
# every later VM of the same shape (OCI containers' too, once made) starts from one.
$H run --no-snapshot --timings --net none --rootfs /var/bb -- sh -c 'echo hello-from-vm; hostname; exit 7' 2>/var/timings; echo "@@RUN-RC $?"
echo "@@TIMINGS-BEGIN"; cat /var/timings; echo "@@TIMINGS-END"
echo piped-in | $H run --net none -i --rootfs /var/bb -- sh -c 'read x; echo got:$x'; echo "@@RUN-I-RC $?"
$H run --net none --rootfs /var/bb -- sh -c 'echo scratch > /written && cat /written'
# The guest's virtio-fs mounts (the sandbox's share and the rootfs; its only backing devices)
# read ahead a request's worth, 1 MiB, not the kernel's 128 KiB.
$H run --net none --rootfs /var/bb -- sh -c 'echo "bdis=$(ls /sys/class/bdi | wc -l) read-ahead=$(cat /sys/class/bdi/*/read_ahead_kb | sort -u | xargs)"'
[ -e /var/bb/written ] && echo "@@ROOTFS-CHANGED"
# What an exited container wrote to a share is on the host when `husk run` returns (its VM is
# stopped without the guest's cleanup once its init, PID 1 of its namespace, is gone).
mkdir -p /var/out
$H run --net none --rootfs /var/bb -v /var/out:/out -- sh -c 'dd if=/dev/zero of=/out/big bs=64k count=64 2>/dev/null; echo last > /out/last'
echo "@@OUT-ON-HOST $(wc -c < /var/out/big) $(cat /var/out/last)"
$H run --net none --rootfs /var/bb -v /var/vol:/data:ro -e GREETING=hi -- sh -c 'echo $GREETING; cat /data/f; touch /data/g 2>/dev/null || echo ro-refused; echo home=$HOME'
# Killed by a signal from outside (PID 1 of a PID namespace ignores its own SIGKILL).
$H run --net none --rootfs /var/bb -- sleep 300 & p=$!
until_ok 120 sh -c "$H list | grep -q 'run-.*running'"
# A VM restored once the shape's working set was recorded maps the read-only part of the
# snapshot's memory (on tmpfs here) in 2 MiB pages.
vmm=$(ps -o pid,args | grep -v grep | grep husk-vmm | awk '{print $1; exit}')
echo "@@VMM-PMD-KB $(awk '/^ShmemPmdMapped:/ {print $2}' /proc/$vmm/smaps_rollup)"
$H kill "$($H list -q | grep run-)" KILL; wait $p; echo "@@RUN-KILLED-RC $?"
# A signal to husk run reaches the process (sh as PID 1 traps it and exits 42).
$H run --net none --rootfs /var/bb -- sh -c 'trap "exit 42" TERM; echo trap-ready; while :; do sleep 1; done' > /var/trap.out &
p=$!
until_ok 120 grep -q trap-ready /var/trap.out; kill -TERM $p; wait $p; echo "@@RUN-TERM-RC $?"
echo "--- image"
umoci init --layout /var/img && umoci new --image /var/img:bb && umoci unpack --image /var/img:bb /var/ib \
  && cp -a /var/bb/. /var/ib/rootfs/ && umoci repack --image /var/img:bb /var/ib \
  && umoci config --image /var/img:bb --config.env IMGVAR=from-image --config.cmd sh --config.cmd -c \
       --config.cmd 'echo $IMGVAR; exit 9' || echo "@@UMOCI-FAILED"
$H run --net none --image /var/img:bb; echo "@@IMAGE-RC $?"
$H run --net none --image /var/img:nope -- true 2>&1; echo "@@IMAGE-BADTAG-RC $?"
echo "--- tty"
timeout 300 script -qec "stty rows 33 cols 111; $H run --net none -it --rootfs /var/bb -- sh -c 'tty; stty size; exit 5'" /dev/null; echo "@@TTY-RC $?"
echo "--- seccomp"
# A VMM that makes a syscall outside its filter dies by SIGSYS, and husk says so.
HUSK_VMM_SECCOMP_SELFTEST=1 $H run --net none --rootfs /var/bb -- true 2>&1; echo "@@SECCOMP-KILL-RC $?"
echo "--- snapshots"
S=/var/lib/husk/vm-snapshots
$H run --timings --net none --rootfs /var/bb -- true 2>/var/timings-restored; echo "@@RESTORED-RC $?"
echo "@@TIMINGS-RESTORED-BEGIN"; cat /var/timings-restored; echo "@@TIMINGS-RESTORED-END"
# Restored siblings: their RNGs differ, and the kernel was told it was forked (VMGenID).
rnd='echo "rand=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n")"; dmesg | grep -c "virtual machine fork" | sed s/^/forks=/'
for i in 1 2; do $H run --net none --rootfs /var/bb -- sh -c "$rnd"; done
$H snapshot ls | tee /var/snap.ls
# The first restored run of the shape recorded its working set, which later restores map in;
# a damaged one is only a lost hint: that run goes on without it and records it again.
for d in $S/*/; do [ -f $d/working-set ] && echo "@@WORKING-SET $(wc -c < $d/working-set)"; done
grep -q "vmm: working set mapped" /var/timings-restored && echo "@@WS-MAPPED"
# ... and the chunks its guests touch most copied into private 2 MiB pages (THP is on here).
grep -q "vmm: busy chunks in 2 MiB pages" /var/timings-restored && echo "@@BUSY-CHUNKS-COPIED"
for d in $S/*/; do [ -f $d/working-set ] && head -c 37 /dev/urandom > $d/working-set; done
$H run --timings --net none --rootfs /var/bb -- echo ws-damaged 2>/var/timings-ws; echo "@@WS-DAMAGED-RC $?"
grep -q "working set mapped" /var/timings-ws && echo "@@WS-DAMAGED-MAPPED"
for d in $S/*/; do [ -f $d/working-set ] && echo "@@WORKING-SET-AGAIN $(wc -c < $d/working-set)"; done
# A damaged snapshot: refused, the run boots cold and says so, and the next run makes a new one.
for d in $S/*/; do [ -f $d/state ] && head -c 3000 $d/state > /var/s.cut && cp /var/s.cut $d/state; done
$H run --net none --rootfs /var/bb -- echo after-truncation 2>&1; echo "@@TRUNCATED-RC $?"
$H run --net none --rootfs /var/bb -- echo remade; echo "@@REMADE-RC $?"
# A foreign one (another VM size's snapshot under this shape's key): refused the same way.
$H snapshot prepare --memory 320 | tee /var/prep.out; echo "@@PREPARE-RC $?"
run_key=$($H snapshot ls | awk '$2 == "256M" && $4 == 2 { print $1 }')
big_key=$($H snapshot ls | awk '$2 == "320M" && $4 == 2 { print $1 }')
[ -n "$run_key" ] && [ -n "$big_key" ] && cp $S/$big_key/state $S/$big_key/memory $S/$run_key/ && echo "@@FOREIGN-PLANTED"
$H run --net none --rootfs /var/bb -- echo after-foreign 2>&1; echo "@@FOREIGN-RC $?"
$H snapshot rm; $H snapshot ls | grep -c 'M ' | sed 's/^/@@SNAPSHOTS-LEFT /'
ls $S | grep -v -x -e digests -e locks | sed 's/^/@@SNAPDIR-LEFT /'
echo "--- missing pieces"
HUSK_KERNEL=/nonexistent $H run --net none --rootfs /var/bb -- true; echo "@@NOKERNEL-RC $?"
$H run --net none --rootfs /nonexistent -- true; echo "@@NOROOTFS-RC $?"
leftovers run

echo "=== oci"
bundle /var/b1 '["sh","-c","echo c1-out; echo c1-err >&2; exec sleep 300"]'
$H --root $R create --bundle /var/b1 --pid-file /var/c1.pid c1 >/var/c1.out 2>/var/c1.err; echo "@@CREATE-RC $?"
$H --root $R state c1 | grep -q '"status": "created"' && echo "@@STATE-CREATED"
[ "$(cat /var/c1.pid)" = "$($H --root $R state c1 | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')" ] && echo "@@PIDFILE-MATCHES"
$H --root $R create --bundle /var/b1 c1; echo "@@DUP-RC $?"
$H --root $R start c1; echo "@@START-RC $?"
$H --root $R start c1; echo "@@START2-RC $?"
until_ok 60 grep -q c1-out /var/c1.out && echo "@@STDOUT-RELAYED"
until_ok 10 grep -q c1-err /var/c1.err && echo "@@STDERR-RELAYED"
$H --root $R state c1 | grep -q '"status": "running"' && echo "@@STATE-RUNNING"
vmm=$(sed -n 's/.*"vmm_pid": *\([0-9]*\).*/\1/p' $R/sandboxes/c1/sandbox.json)
confined $vmm
cfcg=$(cut -d: -f3 /proc/$vmm/cgroup)
$H --root $R list | grep -q '^c1 .*running' && echo "@@LIST-RUNNING"
$H --root $R ps --format json c1 | grep -q '^\[[0-9]' && echo "@@PS-JSON"
$H --root $R ps c1 | grep -q 'sleep' && echo "@@PS-TABLE"
$H --root $R exec c1 sh -c 'echo in-exec; cat /mnt/f; exit 6'; echo "@@EXEC-RC $?"
$H --root $R exec c1 sh -c 'touch /mnt/x' 2>/dev/null; echo "@@EXEC-RO-RC $?"
# The guest keeps a file's cache across opens only while the file is unchanged: a host rewrite
# of the same size shows at the next open.
echo kc-one > /var/bb/kc.txt
$H --root $R exec c1 cat /kc.txt > /var/kc.out; $H --root $R exec c1 cat /kc.txt >> /var/kc.out
echo kc-two > /var/bb/kc.txt
$H --root $R exec c1 cat /kc.txt >> /var/kc.out; echo "@@KEEP-CACHE $(tr '\n' ' ' < /var/kc.out)"
$H --root $R pause c1 && $H --root $R state c1 | grep -q '"status": "paused"' && echo "@@PAUSED"
$H --root $R exec c1 true; echo "@@EXEC-PAUSED-RC $?"
$H --root $R resume c1 && $H --root $R state c1 | grep -q '"status": "running"' && echo "@@RESUMED"
$H --root $R update --memory 96m --pids-limit 50 c1; echo "@@UPDATE-RC $?"
$H --root $R events --stats c1 | grep -q '"type":"stats"' && echo "@@EVENTS-STATS"
$H --root $R kill c1 SIGFOO; echo "@@BADSIG-RC $?"
$H --root $R delete c1; echo "@@DELETE-RUNNING-RC $?"
$H --root $R kill c1 KILL; echo "@@KILL-RC $?"
until_ok 30 sh -c "$H --root $R state c1 | grep -q '\"status\": \"stopped\"'" && echo "@@STATE-STOPPED"
until_ok 10 sh -c "! kill -0 $(cat /var/c1.pid)" && echo "@@RELAY-EXITED"
$H --root $R exec c1 true; echo "@@EXEC-STOPPED-RC $?"
$H --root $R delete c1; echo "@@DELETE-RC $?"
[ -n "$cfcg" ] && [ -e /sys/fs/cgroup$cfcg ] && echo "@@CF-CGROUP-LEFT $cfcg"
$H --root $R state c1; echo "@@STATE-GONE-RC $?"
echo "--- foreground run"
bundle /var/b2 '["sh","-c","echo fg-out; exit 3"]'
$H --root $R run --bundle /var/b2 c2; echo "@@OCI-RUN-RC $?"
echo "--- bad input"
$H --root $R --log /var/err.json --log-format json state nope; echo "@@UNKNOWN-RC $?"
grep -q '"level":"error".*container does not exist' /var/err.json && echo "@@JSON-LOG"
$H --root $R create --bundle /nonexistent x1 2>&1; echo "@@NOBUNDLE-RC $?"
mkdir -p /var/b3 && echo '{"ociVersion": 5' > /var/b3/config.json
$H --root $R create --bundle /var/b3 x2 2>&1; echo "@@BADCONFIG-RC $?"
bundle /var/b4 '["true"]' && sed -i 's#"path":"/var/bb"#"path":"/var/missing-rootfs"#' /var/b4/config.json
$H --root $R create --bundle /var/b4 x3 2>&1; echo "@@BADROOTFS-RC $?"
$H --root $R create --bundle /var/b2 'bad/id' 2>&1; echo "@@BADID-RC $?"
bundle /var/b5 '["true"]' && sed -i 's#"source":"/var/vol"#"source":"/var/no-such-dir"#' /var/b5/config.json
$H --root $R create --bundle /var/b5 x4 2>&1; echo "@@BADMOUNT-RC $?"
bundle /var/b9 '["true"]' && sed -i 's#"destination":"/tmp"#"destination":"/etc/passwd/sub"#' /var/b9/config.json
$H --root $R create --bundle /var/b9 x5 2>&1; echo "@@MOUNT-CAUSE-RC $?"
$H --root $R list -q | grep -q x && echo "@@PARTIAL-STATE"
$H features | grep -q '"ociVersionMax"' && echo "@@FEATURES"
mkdir -p /var/sp && (cd /var/sp && $H spec && grep -q '"ociVersion"' config.json && echo "@@SPEC"; $H spec 2>/dev/null || echo "@@SPEC-EXISTS")
echo "--- concurrent"
bundle /var/b6 '["sh","-c","echo par; exit 0"]'
$H --root $R run --bundle /var/b6 p1 > /var/p1.out & a=$!
$H --root $R run --bundle /var/b6 p2 > /var/p2.out & b=$!
wait $a; ra=$?; wait $b; rb=$?; echo "@@PAR-RC $ra $rb"
bundle /var/b8 '["sleep","300"]'
$H --root $R run -d --bundle /var/b8 c4 >/dev/null 2>&1
$H --root $R delete --force c4 2>/dev/null & a=$!
$H --root $R delete --force c4 2>/dev/null & b=$!
wait $a; ra=$?; wait $b; rb=$?; echo "@@SAME-DELETE-RC $((ra + rb))"
$H --root $R state c4 >/dev/null 2>&1 || echo "@@SAME-DELETE-GONE"
echo "--- pod"
CRI='"io.kubernetes.cri.container-type"'
bundle /var/pod-sb '["sleep","300"]' false "{$CRI:\"sandbox\",\"io.kubernetes.cri.sandbox-id\":\"podsb\"}" \
    '{"type":"ipc"},{"type":"network"}'
$H --root $R run -d --bundle /var/pod-sb --pid-file /var/podsb.pid podsb >/dev/null 2>&1; echo "@@POD-SB-RC $?"
bundle /var/pod-c '["sleep","300"]' false "{$CRI:\"container\",\"io.kubernetes.cri.sandbox-id\":\"podsb\"}" \
    "{\"type\":\"ipc\",\"path\":\"/proc/$(cat /var/podsb.pid)/ns/ipc\"},{\"type\":\"network\",\"path\":\"/proc/$(cat /var/podsb.pid)/ns/net\"}"
$H --root $R run -d --bundle /var/pod-c podc >/dev/null 2>&1; echo "@@POD-C-RC $?"
[ "$(ls $R/sandboxes)" = podsb ] && echo "@@POD-ONE-VM"
sb_ipc=$($H --root $R exec podsb readlink /proc/self/ns/ipc)
c_ipc=$($H --root $R exec podc readlink /proc/self/ns/ipc)
[ -n "$sb_ipc" ] && [ "$sb_ipc" = "$c_ipc" ] && echo "@@POD-SHARED-IPC"
$H --root $R delete --force podc; $H --root $R delete --force podsb; echo "@@POD-DELETE-RC $?"
bundle /var/pod-o '["true"]' false "{$CRI:\"container\",\"io.kubernetes.cri.sandbox-id\":\"nosuch\"}" \
    '{"type":"ipc"},{"type":"network"}'
$H --root $R create --bundle /var/pod-o podo 2>&1; echo "@@POD-ORPHAN-RC $?"
echo "--- kubernetes-shaped"
# A state root of over 80 characters and 64-hex ids, as containerd's CRI gives them.
LR=/run/husk-oci-long/a-state-root-of-more-than-eighty-characters/like-containerds-k8s.io
ID1=$(printf 'a%.0s' $(seq 64)); ID2=$(printf 'b%.0s' $(seq 64))
# FROM scratch with only /pause, read-only, mount points and file binds it lacks.
mkdir -p /var/pause/rootfs && cp @PAUSE@ /var/pause/rootfs/pause && echo 127.0.0.1 localhost > /var/hosts
cat > /var/pause/config.json <<EOC
{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":["/pause"],"cwd":"/"},
 "root":{"path":"rootfs","readonly":true},
 "mounts":[{"destination":"/proc","type":"proc","source":"proc"},
   {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","mode=755"]},
   {"destination":"/dev/shm","type":"tmpfs","source":"shm","options":["nosuid","nodev","noexec"]},
   {"destination":"/etc/hosts","type":"bind","source":"/var/hosts","options":["rbind","ro"]}],
 "linux":{"namespaces":[{"type":"pid"},{"type":"ipc"},{"type":"uts"},{"type":"mount"},{"type":"network"}]}}
EOC
$H --root $LR create --bundle /var/pause --pid-file /var/pause.pid $ID1 2>&1 && $H --root $LR start $ID1 && echo "@@PAUSE-STARTED"
$H --root $LR state $ID1 | grep -q '"status": "running"' && echo "@@PAUSE-RUNNING"
ls /var/pause/rootfs | tr '\n' ' ' | grep -qx 'pause ' && echo "@@PAUSE-ROOTFS-UNTOUCHED"
# Stdio is a pipe, /dev/stdout reopens; a seccomp profile that denies chmod holds in an exec;
# setuid elevates without no_new_privileges; rshared/rslave volumes.
cp @PAUSE@ /var/bb/bin/suid-euid && chmod 4755 /var/bb/bin/suid-euid
mkdir -p /var/vs /var/vl && echo shared-data > /var/vs/f && echo slave-data > /var/vl/f
bundle /var/k1 '["sh","-c","echo via-dev-stdout > /dev/stdout; echo fd1=$(readlink /proc/self/fd/1); touch /tmp/a; chmod 600 /tmp/a 2>/dev/null || echo init-chmod-denied; cat /vs/f /vl/f; exec sleep 300"]'
sed -i 's#"noNewPrivileges":true#"noNewPrivileges":false#; s#"linux":{#"linux":{"rootfsPropagation":"rshared","seccomp":{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["chmod","fchmod","fchmodat"],"action":"SCMP_ACT_ERRNO"}]},#' /var/k1/config.json
sed -i 's#"options":\["rbind","ro"\]}\]#"options":["rbind","ro"]},{"destination":"/vs","type":"bind","source":"/var/vs","options":["rbind","rshared"]},{"destination":"/vl","type":"bind","source":"/var/vl","options":["rbind","rslave"]}]#' /var/k1/config.json
$H --root $LR run -d --bundle /var/k1 --pid-file /var/k1.pid $ID2 > /var/k1.out 2>&1; echo "@@K1-RC $?"
until_ok 60 grep -q slave-data /var/k1.out && cat /var/k1.out
$H --root $LR exec $ID2 sh -c 'grep Seccomp: /proc/self/status; touch /tmp/b; chmod 600 /tmp/b 2>/dev/null || echo exec-chmod-denied'
$H --root $LR exec --user 1000:1000 $ID2 /bin/suid-euid euid
# An exec whose relay dies by SIGKILL (an ExecSync timeout) takes its process with it.
$H --root $LR exec -d --pid-file /var/e1.pid $ID2 sleep 301; echo "@@EXEC-D-RC $?"
kill -9 $(cat /var/e1.pid)
cat > /var/count301 <<'EOC'
n=0; for c in /proc/[0-9]*/cmdline; do tr "\0" " " < $c 2>/dev/null | grep -q "^sleep 301" && n=$((n+1)); done; echo $n
EOC
until_ok 30 sh -c "[ \"\$($H --root $LR exec $ID2 sh -c \"\$(cat /var/count301)\")\" = 0 ]" && echo "@@RELAY-DEATH-KILLED"
$H --root $LR kill $ID2 KILL; until_ok 30 sh -c "$H --root $LR state $ID2 | grep -q '\"status\": \"stopped\"'"
$H --root $LR kill $ID2 TERM 2>&1; echo "@@KILL-EXITED-RC $?"
$H --root $LR delete --force $ID2; $H --root $LR delete --force $ID2; echo "@@DELETE-GONE-RC $?"
$H --root $LR delete --force $ID1; echo "@@PAUSE-DELETE-RC $?"
find $LR/containers $LR/sandboxes -mindepth 1 2>/dev/null | grep -q . || echo "@@LONG-ROOT-CLEAN"
echo "--- hooks, namespaces, mount names"
# Host hooks in the runtime spec's order, each with the state on stdin.
cat > /var/hook.sh <<'EOC'
#!/bin/sh
echo "$1 $(cat)" >> /var/hooks.log
EOC
chmod +x /var/hook.sh
hk() { echo "{\"path\":\"/var/hook.sh\",\"args\":[\"hook.sh\",\"$1\"],\"env\":[\"PATH=/usr/bin:/bin\"],\"timeout\":60}"; }
HOOKS="\"hooks\":{\"prestart\":[$(hk prestart)],\"createRuntime\":[$(hk createRuntime)],\"poststart\":[$(hk poststart)],\"poststop\":[$(hk poststop)]},"
bundle /var/h1 '["sh","-c","cut -d\" \" -f4,5 /proc/self/mountinfo; exec sleep 300"]'
sed -i "s#^{\"ociVersion\":\"1.0.2\",#{\"ociVersion\":\"1.0.2\",$HOOKS#" /var/h1/config.json
$H --root $R run -d --bundle /var/h1 h1 > /var/h1.out 2>&1; echo "@@HOOKS-RUN-RC $?"
until_ok 60 grep -q ' /mnt' /var/h1.out && grep ' /mnt' /var/h1.out
$H --root $R delete --force h1; echo "@@HOOKS-DELETE-RC $?"
until_ok 10 grep -q poststop /var/hooks.log; cut -c1-160 /var/hooks.log
# A failing prestart hook fails create and leaves nothing running.
bundle /var/h2 '["sleep","300"]'
sed -i 's#^{"ociVersion":"1.0.2",#{"ociVersion":"1.0.2","hooks":{"prestart":[{"path":"/bin/false"}]},#' /var/h2/config.json
$H --root $R create --bundle /var/h2 h2 2>&1; echo "@@HOOK-FAIL-RC $?"
$H --root $R state h2 >/dev/null 2>&1 || echo "@@HOOK-FAIL-GONE"
ps -o args | grep -v grep | grep -q husk-vmm && echo "@@LEFTOVER-HOOK-VMM"
[ -e $R/sandboxes/h2 ] && echo "@@LEFTOVER-HOOK-SANDBOX"
bundle /var/h3 '["true"]'
sed -i 's#^{"ociVersion":"1.0.2",#{"ociVersion":"1.0.2","hooks":{"createContainer":[{"path":"/bin/true"}]},#' /var/h3/config.json
$H --root $R create --bundle /var/h3 h3 2>&1; echo "@@HOOK-CC-RC $?"
# Namespace paths are checked even where husk does not join them.
bundle /var/n1 '["true"]' false '{}' '{"type":"network"},{"type":"cgroup","path":"/proc/self/ns/ipc"}'
$H --root $R create --bundle /var/n1 n1 2>&1; echo "@@NS-TYPE-RC $?"
bundle /var/n2 '["true"]' false '{}' '{"type":"network","path":"/run/netns/no-such-netns"}'
$H --root $R create --bundle /var/n2 n2 2>&1; echo "@@NS-MISSING-RC $?"
# No network namespace is the host's network, which a VM cannot share (ctr --net-host).
bundle /var/n3 '["true"]' false '{}' '{"type":"ipc"}'
$H --root $R create --bundle /var/n3 n3 2>&1; echo "@@HOSTNET-RC $?"
echo "--- vmm killed"
bundle /var/b7 '["sleep","300"]'
$H --root $R run -d --bundle /var/b7 c3 >/dev/null 2>&1; echo "@@C3-RC $?"
vmm=$(sed -n 's/.*"vmm_pid": \([0-9]*\).*/\1/p' $R/sandboxes/c3/sandbox.json)
kill -9 $vmm; echo "@@VMM-KILLED $vmm"
until_ok 20 sh -c "$H --root $R state c3 | grep -q '\"status\": \"stopped\"'" && echo "@@CRASH-STOPPED"
$H --root $R delete --force c3; echo "@@CRASH-DELETE-RC $?"
leftovers oci

echo "=== containerd"
mkdir -p /var/ctrd
cat > /var/ctrd/config.toml <<EOC
version = 2
root = "/var/ctrd/root"
state = "/run/ctrd"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "/run/ctrd.sock"
EOC
# containerd finds containerd-shim-husk-v2 (runtime io.containerd.husk.v2) on its PATH.
PATH=$PATH:$(dirname $H) containerd --config /var/ctrd/config.toml >/var/ctrd/log 2>&1 &
ctrd=$!
C="ctr --address /run/ctrd.sock"
until_ok 30 $C version && echo "@@CONTAINERD-UP"
$C run --rm --runc-binary $H --env PATH=/bin --rootfs /var/bb t1 sh -c 'echo hi-from-ctr; exit 3'; echo "@@CTR-RC $?"
$C run -d --runc-binary $H --env PATH=/bin --rootfs /var/bb t2 sleep 300; echo "@@CTR-D-RC $?"
$C task exec --exec-id e1 t2 sh -c 'echo in-ctr-exec; exit 4'; echo "@@CTR-EXEC-RC $?"
$C task ps t2 | grep -Eq '^[0-9]+' && echo "@@CTR-PS"
$C task pause t2 && $C task ls | grep -q 't2.*PAUSED' && echo "@@CTR-PAUSED"
$C task resume t2 && $C task ls | grep -q 't2.*RUNNING' && echo "@@CTR-RESUMED"
$C task kill -s SIGKILL t2; echo "@@CTR-KILL-RC $?"
until_ok 30 sh -c "$C task ls | grep -q 't2.*STOPPED'" && echo "@@CTR-STOPPED"
$C task delete t2; echo "@@CTR-TASK-DELETE-RC $?"
$C container delete t2; echo "@@CTR-CONTAINER-DELETE-RC $?"
script -qec "$C run -t --rm --runc-binary $H --env PATH=/bin --rootfs /var/bb t3 sh -c 'tty; exit 0'" /dev/null; echo "@@CTR-TTY-RC $?"
echo "--- husk shim"
S="--runtime io.containerd.husk.v2"
$C run --rm $S --env PATH=/bin --rootfs /var/bb s1 sh -c 'echo hi-from-shim; echo shim-err >&2; exit 5'; echo "@@SHIM-RC $?"
$C run -d $S --env PATH=/bin --rootfs /var/bb s2 sleep 300; echo "@@SHIM-D-RC $?"
$C task exec --exec-id e1 s2 sh -c 'echo in-shim-exec; exit 4'; echo "@@SHIM-EXEC-RC $?"
$C task ps s2 | grep -Eq '^[0-9]+' && echo "@@SHIM-PS"
$C task metrics s2 > /var/metrics.out 2>&1; echo "@@SHIM-METRICS-RC $?"; head -20 /var/metrics.out
$C task pause s2 && $C task ls | grep -q 's2.*PAUSED' && echo "@@SHIM-PAUSED"
$C task resume s2 && $C task ls | grep -q 's2.*RUNNING' && echo "@@SHIM-RESUMED"
$C task kill -s SIGKILL s2; echo "@@SHIM-KILL-RC $?"
until_ok 30 sh -c "$C task ls | grep -q 's2.*STOPPED'" && echo "@@SHIM-STOPPED"
$C task exec --exec-id e2 s2 true 2>&1; echo "@@SHIM-EXEC-STOPPED-RC $?"
$C task delete s2; echo "@@SHIM-TASK-DELETE-RC $?"
$C container delete s2; echo "@@SHIM-CONTAINER-DELETE-RC $?"
script -qec "$C run -t --rm $S --env PATH=/bin --rootfs /var/bb s3 sh -c 'tty; exit 0'" /dev/null; echo "@@SHIM-TTY-RC $?"
# A containerd restart leaves a running task alone; the restarted containerd reconnects.
$C run -d $S --env PATH=/bin --rootfs /var/bb s4 sleep 300; echo "@@SHIM-S4-RC $?"
kill $ctrd; wait $ctrd
PATH=$PATH:$(dirname $H) containerd --config /var/ctrd/config.toml >>/var/ctrd/log 2>&1 &
ctrd=$!
until_ok 30 $C version && $C task ls | grep -q 's4.*RUNNING' && echo "@@SHIM-SURVIVED-RESTART"
$C task exec --exec-id e3 s4 sh -c 'echo after-restart' ; echo "@@SHIM-EXEC-AFTER-RESTART-RC $?"
# husk-vmm killed under a task: the task exits.
kill -9 $(sed -n 's/.*"vmm_pid": \([0-9]*\).*/\1/p' /run/husk/containerd/default/sandboxes/s4/sandbox.json)
until_ok 30 sh -c "$C task ls | grep -q 's4.*STOPPED'" && echo "@@SHIM-VMM-KILLED-STOPPED"
$C task delete s4; $C container delete s4; echo "@@SHIM-S4-DELETE-RC $?"
until_ok 20 sh -c "! ps -o args | grep -v grep | grep -q containerd-shim-husk" || { echo "@@LEFT-SHIM"; ps -o pid,args | grep containerd-shim-husk; }
kill $ctrd; wait $ctrd
leftovers containerd

echo "=== podman"
P="podman --root /var/pm/root --runroot /run/pm --runtime $H --cgroup-manager cgroupfs --events-backend file --storage-driver vfs"
$P run --rm --network none --rootfs /var/bb sh -c 'echo hi; exit 4'; echo "@@PODMAN-RC $?"
$P run -d --network none --name pc1 --rootfs /var/bb sleep 300 >/dev/null; echo "@@PODMAN-D-RC $?"
$P exec pc1 sh -c 'echo in-podman-exec; exit 2'; echo "@@PODMAN-EXEC-RC $?"
$P rm -f -t 0 pc1 >/dev/null; echo "@@PODMAN-RM-RC $?"
leftovers podman
kill $watch
"##;

fn section<'a>(o: &'a str, start: &str, end: Option<&str>) -> &'a str {
    let from = o.find(start).unwrap_or(o.len());
    let to = end.and_then(|e| o[from..].find(e).map(|i| from + i)).unwrap_or(o.len());
    &o[from..to]
}

fn expect(text: &str, needles: &[&str], part: &str) {
    for n in needles {
        assert!(text.contains(n), "{part}: expected {n:?} in:\n{text}");
    }
}

/// The `confined` lines of the OCI part: every thread filtered and without privileges but the
/// fs server's, root is the jail, namespaces and cgroup are the VMM's own, limits set.
/// `husk run --timings`: every phase of the run is there, in the order it happens, and the
/// deltas add up to the total.
/// When the first phase named `name...` happened (ms since CLI start).
fn phase_at(phases: &[(String, f64, f64)], name: &str, text: &str) -> f64 {
    phases
        .iter()
        .find(|(n, _, _)| n.starts_with(name))
        .map(|p| p.1)
        .unwrap_or_else(|| panic!("no phase {name:?} in the timings:\n{text}"))
}

/// A run's process is started by its create: the agent gets no StartContainer call.
fn no_start_call(phases: &[(String, f64, f64)], text: &str) {
    assert!(
        !phases.iter().any(|(n, _, _)| n.starts_with("agent: StartContainer")),
        "the run started its container with a call of its own:\n{text}"
    );
}

fn check_timings(text: &str) {
    let phases = husk_core::timeline::parse(text);
    let at = |name: &str| phase_at(&phases, name, text);
    let order = [
        "cli start",
        "create: container reserved",
        "create: sandbox lock taken",
        "vmm config written",
        "vmm: process started",
        "vmm: kernel loaded",
        "vmm: initramfs loaded",
        "vmm: devices made",
        "vmm: VM built",
        "vmm: first vCPU entry",
        "guest: kernel hands over to init",
        "guest: agent ready",
        "agent connected",
        "agent: CreateSandbox answered",
        "agent: CreateContainer answered",
        "create done",
        "container started",
        "relay: exit seen",
        "vmm exited",
        "teardown done",
    ];
    let times: Vec<f64> = order.iter().map(|n| at(n)).collect();
    for (w, n) in times.windows(2).zip(order.windows(2)) {
        assert!(w[0] <= w[1], "{} ({} ms) after {} ({} ms):\n{text}", n[0], w[0], n[1], w[1]);
    }
    // A cold agent's readiness is an event: it announced itself before the host connected.
    assert!(
        at("vmm: first vCPU entry") <= at("agent: announced it serves")
            && at("agent: announced it serves") <= at("agent connected"),
        "{text}"
    );
    // One agent connection for the whole run (stdio streams are not agent connections).
    let conns = phases.iter().filter(|(n, _, _)| n.starts_with("agent connected")).count();
    assert_eq!(conns, 1, "agent connections:\n{text}");
    no_start_call(&phases, text);
    let (total, sum) = (phases.last().map_or(0.0, |p| p.1), phases.iter().map(|p| p.2).sum::<f64>());
    assert!((total - sum).abs() < 0.1 * phases.len() as f64, "deltas {sum} ms vs total {total} ms:\n{text}");
    assert!(total > 0.0 && total < 600_000.0, "total {total} ms:\n{text}");
}

/// Sandboxes from snapshots: a restored run's phases (no guest boot in them) and how much
/// sooner its agent answers than a cold one's; siblings' RNGs differ and each kernel was told
/// it is a new generation; the first restored run records the snapshot's working set, later
/// ones map it in, and a damaged one is ignored; damaged and foreign snapshots are refused
/// with a message, the run boots cold, and the next run makes a new snapshot.
fn check_snapshots(s: &str, cold: &str) {
    expect(
        s,
        &[
            "@@RESTORED-RC 0",
            "is unusable, booting cold",
            "after-truncation\n@@TRUNCATED-RC 0",
            "remade\n@@REMADE-RC 0",
            "@@PREPARE-RC 0",
            "@@FOREIGN-PLANTED",
            "after-foreign\n@@FOREIGN-RC 0",
            "@@SNAPSHOTS-LEFT 0",
            "@@WS-MAPPED",
            "@@BUSY-CHUNKS-COPIED",
            "ws-damaged\n@@WS-DAMAGED-RC 0",
        ],
        "snapshots",
    );
    // One shape's snapshot (`--rootfs`'s) recorded a working set: header and at least a run.
    let sizes: Vec<u64> =
        s.lines().filter_map(|l| l.strip_prefix("@@WORKING-SET ")?.trim().parse().ok()).collect();
    assert!(
        !sizes.is_empty() && sizes.iter().all(|&n| n > 16 && (n - 16) % 8 == 0),
        "working sets {sizes:?}:\n{s}"
    );
    assert!(!s.contains("@@WS-DAMAGED-MAPPED"), "a damaged working set was mapped:\n{s}");
    let again: Vec<u64> =
        s.lines().filter_map(|l| l.strip_prefix("@@WORKING-SET-AGAIN ")?.trim().parse().ok()).collect();
    assert!(
        again.len() == sizes.len() && again.iter().all(|&n| n > 16 && (n - 16) % 8 == 0),
        "the damaged working set was not recorded again: {again:?}:\n{s}"
    );
    assert!(!s.contains("@@SNAPDIR-LEFT"), "snapshot rm left entries:\n{s}");
    let restored = section(s, "@@TIMINGS-RESTORED-BEGIN", Some("@@TIMINGS-RESTORED-END"));
    let phases = husk_core::timeline::parse(restored);
    assert!(
        !phases.iter().any(|(n, _, _)| n.starts_with("guest:")),
        "a restored guest did not boot:\n{restored}"
    );
    let at = phase_at;
    let order = [
        "cli start",
        "snapshot looked up",
        "vmm: VM built",
        "vmm: first vCPU entry",
        "agent connected",
        "agent: CreateContainer answered",
        "container started",
        "relay: exit seen",
        "vmm exited",
        "teardown done",
    ];
    let times: Vec<f64> = order.iter().map(|n| at(&phases, n, restored)).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "restored phases out of order:\n{restored}");
    no_start_call(&phases, restored);
    let cold_phases = husk_core::timeline::parse(cold);
    let ready = |p: &[(String, f64, f64)], t: &str| at(p, "agent connected", t) - at(p, "vmm spawned", t);
    let (r, c) = (ready(&phases, restored), ready(&cold_phases, cold));
    eprintln!("snapshots: VMM spawn to agent connected: restored {r:.0} ms, cold {c:.0} ms ({:.2}x)", r / c);
    assert!(r * 2.0 < c, "a restored VM's agent ({r} ms) should answer well before a cold one's ({c} ms)");
    let rands: Vec<&str> = s.lines().filter_map(|l| l.strip_prefix("rand=")).collect();
    assert_eq!(rands.len(), 2, "{s}");
    assert_eq!(rands[0].len(), 32, "{s}");
    assert_ne!(rands[0], rands[1], "two restored VMs gave the same random bytes:\n{s}");
    let forks: Vec<&str> = s.lines().filter_map(|l| l.strip_prefix("forks=")).collect();
    assert_eq!(forks, ["1", "1"], "each restored guest's kernel reseeds once on its new VMGenID:\n{s}");
}

fn check_confinement(oci: &str) {
    assert!(!oci.contains("@@CF-NO-"), "a thread is not confined:\n{oci}");
    assert!(!oci.contains("@@CF-SAME-NS"), "the VMM shares a namespace with the host:\n{oci}");
    assert!(!oci.contains("@@CF-CGROUP-LEFT"), "{oci}");
    let threads: Vec<&str> = oci.lines().filter_map(|l| l.strip_prefix("@@CF-THREAD ")).collect();
    for kind in ["husk-vmm", "vcpu0", "virtio-fs", "virtio-vsock", "virtio-rng"] {
        assert!(threads.iter().any(|t| t.starts_with(kind)), "no {kind} thread in {threads:?}");
    }
    for t in &threads {
        // Only the fs server keeps capabilities (chown, dac_*, fowner, fsetid, setuid/gid,
        // mknod, setfcap: 0x880000df).
        let want =
            if t.starts_with("virtio-fs") { "CapEff:00000000880000df" } else { "CapEff:0000000000000000" };
        assert!(t.ends_with(want), "{t}: expected {want}");
    }
    expect(oci, &["@@CF-ROOT proc shares vsock \n", "@@CF-NOFILE 65536"], "VMM jail");
    let cg = oci.lines().find_map(|l| l.strip_prefix("@@CF-CGROUP ")).expect("cgroup line");
    // 256 MiB of guest RAM plus the VMM's 256 MiB allowance; 160 + 1 vCPU pids.
    assert!(cg.starts_with("/husk/c1 mem=536870912 pids=161 procs="), "{cg}");
    let share_mounts: Vec<&str> = oci.lines().filter_map(|l| l.strip_prefix("@@CF-SHARE-MOUNT ")).collect();
    assert!(
        !share_mounts.is_empty()
            && share_mounts.iter().all(|m| m.split(' ').nth(1).is_some_and(|o| o.starts_with("ro"))),
        "the read-only volume must be read-only in the VMM's mount namespace: {share_mounts:?}"
    );
    let fds: usize = oci
        .lines()
        .find_map(|l| l.strip_prefix("@@CF-FDS "))
        .and_then(|n| n.trim().parse().ok())
        .expect("fd count");
    assert!(fds < 200, "{fds} descriptors open in the VMM");
}

#[test]
fn husk_runtime_with_husk_run_the_oci_cli_containerd_and_podman() {
    let kit = require!(RuntimeTestKit::find());
    let d = |p: &Path| p.display().to_string();
    let pause = require!(guest_bin("husk-pause"));
    let script = SCRIPT
        .replace("@HUSK@", &d(&kit.husk))
        .replace("@BUSYBOX@", &d(&kit.busybox))
        .replace("@PAUSE@", &d(&pause));
    let mut job = Job::new(script).timeout(Duration::from_secs(1800));
    job.files.extend(kit.files().map(Path::to_path_buf));
    job.files.push(pause);
    // One L1 CPU: with two, the nested test host (QEMU TCG emulating SVM) now and then stalled
    // completely with both CPUs spinning, or triple-faulted an L2 guest at boot, once several
    // processes and VMs were busy at the same time; with one it did neither in the runs here.
    job.cpus = 1;
    job.mem_mib = 3072;
    // Its watchdog prints every 120 s: silence for longer is a stalled L1, run once more.
    job.stall_after = Some(Duration::from_secs(420));
    let out = run_job(&job).unwrap_or_else(|e| panic!("test host failed: {e}"));
    let o = &out.output;
    eprintln!("test host: {:?}\n{o}", out.elapsed);
    assert!(!o.contains("@@NO-CGROUP2"), "{o}");
    assert!(!o.contains("@@LEFT-"), "something was left behind:\n{o}");

    let run = section(o, "=== husk run", Some("=== oci"));
    expect(
        run,
        &[
            "hello-from-vm\nhusk\n@@RUN-RC 7",
            "got:piped-in\n@@RUN-I-RC 0",
            "scratch",
            // HOME as runc sets it: root's from the rootfs's /etc/passwd.
            "hi\nvol-data\nro-refused\nhome=/root\n",
            "bdis=2 read-ahead=1024\n",
            "@@OUT-ON-HOST 4194304 last\n",
            "@@RUN-KILLED-RC 137",
            "@@RUN-TERM-RC 42",
            "from-image\n@@IMAGE-RC 9",
            "/dev/pts/",
            "33 111",
            "@@TTY-RC 5",
            "hint:",
            "@@CLEAN-CHECKED run",
        ],
        "husk run",
    );
    assert!(!run.contains("@@ROOTFS-CHANGED"), "husk run wrote into its rootfs:\n{run}");
    let pmd_kb: Option<u64> = run.lines().find_map(|l| l.strip_prefix("@@VMM-PMD-KB ")?.trim().parse().ok());
    assert!(
        pmd_kb.is_some_and(|kb| kb >= 2048),
        "a restored VM mapped no 2 MiB page of the snapshot's memory (ShmemPmdMapped {pmd_kb:?} kB):\n{run}"
    );
    check_timings(section(run, "@@TIMINGS-BEGIN", Some("@@TIMINGS-END")));
    check_snapshots(
        section(run, "--- snapshots", Some("--- missing pieces")),
        section(run, "@@TIMINGS-BEGIN", Some("@@TIMINGS-END")),
    );
    // The seccomp self-test: the main thread's getppid (110) is outside its filter.
    expect(
        run,
        &["killed by SIGSYS", &format!("the main thread made syscall {}", libc::SYS_getppid)],
        "seccomp violation",
    );
    assert!(!run.contains("@@SECCOMP-KILL-RC 0"), "{run}");
    assert!(!run.contains("@@UMOCI-FAILED"), "{run}");
    for rc in ["@@IMAGE-BADTAG-RC 0", "@@NOKERNEL-RC 0", "@@NOROOTFS-RC 0"] {
        assert!(!run.contains(rc), "{rc} must fail:\n{run}");
    }

    let oci = section(o, "=== oci", Some("=== containerd"));
    check_confinement(oci);
    expect(
        oci,
        &[
            "@@CREATE-RC 0",
            "@@STATE-CREATED",
            "@@PIDFILE-MATCHES",
            "container with id exists: c1",
            "@@START-RC 0",
            "@@STDOUT-RELAYED",
            "@@STDERR-RELAYED",
            "@@STATE-RUNNING",
            "@@LIST-RUNNING",
            "@@PS-JSON",
            "@@PS-TABLE",
            "in-exec\nvol-data\n@@EXEC-RC 6",
            "@@KEEP-CACHE kc-one kc-one kc-two ",
            "@@PAUSED",
            "@@RESUMED",
            "@@UPDATE-RC 0",
            "@@EVENTS-STATS",
            "unknown signal",
            "cannot delete container c1 that is not stopped: running",
            "@@KILL-RC 0",
            "@@STATE-STOPPED",
            "@@RELAY-EXITED",
            "@@DELETE-RC 0",
            "container does not exist: c1",
            "fg-out\n@@OCI-RUN-RC 3",
            "@@JSON-LOG",
            "invalid OCI spec",
            "missing-rootfs",
            "invalid container id",
            "no-such-dir",
            // The container library's own cause: which path failed, and how.
            "/etc/passwd/sub",
            "@@FEATURES",
            "@@SPEC",
            "@@SPEC-EXISTS",
            "@@PAR-RC 0 0",
            "@@SAME-DELETE-GONE",
            "@@POD-SB-RC 0",
            "@@POD-C-RC 0",
            "@@POD-ONE-VM",
            "@@POD-SHARED-IPC",
            "@@POD-DELETE-RC 0",
            "sandbox nosuch does not exist",
            "@@PAUSE-STARTED",
            "@@PAUSE-RUNNING",
            "@@PAUSE-ROOTFS-UNTOUCHED",
            "@@K1-RC 0",
            "via-dev-stdout\nfd1=pipe:",
            "init-chmod-denied",
            "shared-data\nslave-data",
            "Seccomp:\t2\nexec-chmod-denied",
            "euid=0",
            "@@EXEC-D-RC 0",
            "@@RELAY-DEATH-KILLED",
            "container not running",
            "@@KILL-EXITED-RC 1",
            "@@DELETE-GONE-RC 0",
            "@@PAUSE-DELETE-RC 0",
            "@@LONG-ROOT-CLEAN",
            "@@HOOKS-RUN-RC 0",
            // The bind source /var/vol keeps its base name in the guest's mountinfo.
            "/mounts/3/vol /mnt",
            "@@HOOKS-DELETE-RC 0",
            "prestart {\"ociVersion\":\"1.0.2-dev\",\"id\":\"h1\",\"status\":\"creating\",\"pid\":",
            "createRuntime {\"ociVersion\":\"1.0.2-dev\",\"id\":\"h1\",\"status\":\"creating\"",
            "poststart {\"ociVersion\":\"1.0.2-dev\",\"id\":\"h1\",\"status\":\"running\"",
            "poststop {\"ociVersion\":\"1.0.2-dev\",\"id\":\"h1\",\"status\":\"stopped\"",
            "prestart hook /bin/false",
            "@@HOOK-FAIL-GONE",
            "createContainer hook /bin/true",
            "namespace cgroup path /proc/self/ns/ipc: is a namespace of type ipc",
            "namespace network path /run/netns/no-such-netns: No such file",
            "asks for the host's network",
            "@@C3-RC 0",
            "@@CRASH-STOPPED",
            "@@CRASH-DELETE-RC 0",
            "@@CLEAN-CHECKED oci",
        ],
        "oci",
    );
    for rc in [
        "@@DUP-RC 0",
        "@@START2-RC 0",
        "@@EXEC-RO-RC 0",
        "@@EXEC-PAUSED-RC 0",
        "@@BADSIG-RC 0",
        "@@DELETE-RUNNING-RC 0",
        "@@EXEC-STOPPED-RC 0",
        "@@STATE-GONE-RC 0",
        "@@UNKNOWN-RC 0",
        "@@NOBUNDLE-RC 0",
        "@@BADCONFIG-RC 0",
        "@@BADROOTFS-RC 0",
        "@@BADID-RC 0",
        "@@BADMOUNT-RC 0",
        "@@POD-ORPHAN-RC 0",
        "@@MOUNT-CAUSE-RC 0",
        "@@HOOK-FAIL-RC 0",
        "@@HOOK-CC-RC 0",
        "@@NS-TYPE-RC 0",
        "@@NS-MISSING-RC 0",
        "@@HOSTNET-RC 0",
    ] {
        assert!(!oci.contains(rc), "{rc} must fail:\n{oci}");
    }
    assert!(!oci.contains("@@PARTIAL-STATE"), "a failed create left state:\n{oci}");
    assert!(!oci.contains("@@LEFTOVER-HOOK"), "a failed prestart hook left something:\n{oci}");
    // The hooks ran in the spec's order.
    let at = |n: &str| oci.find(n).unwrap_or_else(|| panic!("{n} missing:\n{oci}"));
    assert!(at("prestart {") < at("createRuntime {") && at("createRuntime {") < at("poststart {"), "{oci}");
    assert!(at("poststart {") < at("poststop {"), "{oci}");

    let ctrd = section(o, "=== containerd", Some("=== podman"));
    expect(
        ctrd,
        &[
            "@@CONTAINERD-UP",
            "hi-from-ctr\n@@CTR-RC 3",
            "@@CTR-D-RC 0",
            "in-ctr-exec\n@@CTR-EXEC-RC 4",
            "@@CTR-PS",
            "@@CTR-PAUSED",
            "@@CTR-RESUMED",
            "@@CTR-KILL-RC 0",
            "@@CTR-STOPPED",
            "@@CTR-TASK-DELETE-RC 0",
            "@@CTR-CONTAINER-DELETE-RC 0",
            "/dev/pts/",
            "@@CTR-TTY-RC 0",
            "hi-from-shim",
            "shim-err",
            "@@SHIM-RC 5",
            "@@SHIM-D-RC 0",
            "in-shim-exec\n@@SHIM-EXEC-RC 4",
            "@@SHIM-PS",
            "@@SHIM-METRICS-RC 0",
            "@@SHIM-PAUSED",
            "@@SHIM-RESUMED",
            "@@SHIM-KILL-RC 0",
            "@@SHIM-STOPPED",
            "@@SHIM-TASK-DELETE-RC 0",
            "@@SHIM-CONTAINER-DELETE-RC 0",
            "@@SHIM-TTY-RC 0",
            "@@SHIM-S4-RC 0",
            "@@SHIM-SURVIVED-RESTART",
            "after-restart\n@@SHIM-EXEC-AFTER-RESTART-RC 0",
            "@@SHIM-VMM-KILLED-STOPPED",
            "@@SHIM-S4-DELETE-RC 0",
            "@@CLEAN-CHECKED containerd",
        ],
        "containerd",
    );

    assert!(!ctrd.contains("@@SHIM-EXEC-STOPPED-RC 0"), "an exec into a stopped task must fail:\n{ctrd}");

    let podman = section(o, "=== podman", None);
    expect(
        podman,
        &[
            "hi\n@@PODMAN-RC 4",
            "@@PODMAN-D-RC 0",
            "in-podman-exec\n@@PODMAN-EXEC-RC 2",
            "@@PODMAN-RM-RC 0",
            "@@CLEAN-CHECKED podman",
        ],
        "podman",
    );
}
