#!/usr/bin/env bash
# Image benchmarks, against peers measured in the same run, printed as ratios:
#  (i)  on this host: `husk pull` of a ~100 MiB image of 5 layers (random data, so gzip cannot
#       shrink it) from a local docker-registry on 127.0.0.1 into an empty store, vs
#       `skopeo copy docker://... oci:DIR` into an empty directory; N rounds each, medians.
#  (ii) in one test-host run (KVM; nested under QEMU TCG on the development machines, so ~10x
#       slower than native): `husk run --net none IMAGE -- true` cold (after `husk rmi` and
#       `husk image prune`: pull + unpack + boot) and warm (nothing to pull or unpack), vs
#       `podman run --rm` of the same image from the same registry, cold (`podman rmi` first)
#       and warm. podman runs with `--runtime husk`, so both sides boot the same microVM and the
#       ratios compare image handling (podman: containers/image + overlay storage).
#
# Usage: bench/images.sh [host|vm|all]   (default all)
# Environment: N (host rounds, default 3), VM_N (test-host rounds, default 2),
#              LAYER_MIB (size of each of the 5 layers, default 20).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
what=${1:-all}
case $what in host|vm|all) ;; *) echo "usage: $0 [host|vm|all]" >&2; exit 2;; esac
N=${N:-3}
VM_N=${VM_N:-2}
LAYER_MIB=${LAYER_MIB:-20}

"$root/tests/build-artifacts.sh"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
husk="$target/release/husk"
for t in docker-registry skopeo umoci podman conmon; do
    command -v $t >/dev/null || { echo "$t is not installed (see tests/build-artifacts.sh)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/husk-bench-images.XXXXXX)
reg_pid=
cleanup() {
    [[ -n $reg_pid ]] && kill "$reg_pid" 2>/dev/null && wait "$reg_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{v[NR]=$1} END {if (NR % 2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }

echo "==> building the bench image: busybox + 5 layers of $LAYER_MIB MiB random data" >&2
umoci init --layout "$work/oci" >/dev/null
umoci new --image "$work/oci:bench" >/dev/null
for i in 1 2 3 4 5; do
    d="$work/l$i"
    mkdir -p "$d/data"
    if [[ $i == 1 ]]; then
        mkdir -p "$d/bin"
        cp /bin/busybox "$d/bin/busybox"
        for a in true sh; do ln -s busybox "$d/bin/$a"; done
    fi
    head -c "$((LAYER_MIB << 20))" /dev/urandom > "$d/data/random-$i"
    tar -C "$d" -cf "$work/l$i.tar" .
    umoci raw add-layer --image "$work/oci:bench" "$work/l$i.tar" >/dev/null
    rm -rf "$d" "$work/l$i.tar"
done
umoci config --image "$work/oci:bench" --config.env PATH=/bin --config.cmd true >/dev/null
image_mib=$(du -sm "$work/oci/blobs" | cut -f1)

# A free port: one nothing answers on.
port=
for _ in $(seq 50); do
    p=$(( 20000 + RANDOM % 40000 ))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { port=$p; break; }
done
[[ -n $port ]] || { echo "no free port found" >&2; exit 1; }
mkdir -p "$work/storage"
cat > "$work/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $work/storage
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$port
EOF
env -u REGISTRY_AUTH_FILE docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
reg_pid=$!
up=
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && { up=1; break; }
    sleep 0.1
done
[[ -n $up ]] || { echo "docker-registry did not start:" >&2; cat "$work/registry.log" >&2; exit 1; }
export REGISTRY_AUTH_FILE="$work/auth.json"
R="127.0.0.1:$port"
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$work/oci:bench" "docker://$R/bench:1"
rm -rf "$work/oci"
echo "==> image $R/bench:1: $image_mib MiB of blobs in 5 layers" >&2

if [[ $what != vm ]]; then
    echo "==> (i) pulls on this host, $N rounds each" >&2
    husk_ms=() skopeo_ms=()
    for i in $(seq "$N"); do
        rm -rf "$work/store" "$work/skopeo-out"
        t=$(now_ms)
        HUSK_IMAGE_ROOT="$work/store" "$husk" pull -q "$R/bench:1" >/dev/null
        husk_ms+=($(( $(now_ms) - t )))
        t=$(now_ms)
        skopeo --insecure-policy copy -q --src-tls-verify=false "docker://$R/bench:1" "oci:$work/skopeo-out:bench"
        skopeo_ms+=($(( $(now_ms) - t )))
        echo "round $i: husk pull ${husk_ms[-1]} ms, skopeo copy ${skopeo_ms[-1]} ms" >&2
    done
    rm -rf "$work/store" "$work/skopeo-out"
    hp=$(printf '%s\n' "${husk_ms[@]}" | median)
    sp=$(printf '%s\n' "${skopeo_ms[@]}" | median)
    echo "BENCH host-husk-pull-ms $hp"
    echo "BENCH host-skopeo-copy-ms $sp"
    echo "BENCH host-pull-ratio-husk/skopeo $(ratio "$hp" "$sp")"
    echo "pull of $image_mib MiB (5 layers) from a local registry into an empty store, median of $N:" \
         "husk pull $hp ms, skopeo copy $sp ms; husk/skopeo $(ratio "$hp" "$sp")x (target <= 1.0)"
fi

if [[ $what != host ]]; then
    echo "==> (ii) husk run vs podman run in the test host, $VM_N rounds each" >&2
    kill "$reg_pid" && wait "$reg_pid" 2>/dev/null || true
    reg_pid=
    script=$(cat <<'EOS'
H=@HUSK@
R=127.0.0.1:5000
I=$R/bench:1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HUSK_IMAGE_ROOT=/var/hs
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# Both stores on a tmpfs of their own (overlay's upper directories need xattrs).
mkdir -p /var/hs /var/pm /var/tmp && mount -t tmpfs tmpfs /var/hs && mount -t tmpfs tmpfs /var/pm
cat > /var/reg.yml <<EOC
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: @STORAGE@
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $R
EOC
docker-registry serve /var/reg.yml > /var/reg.log 2>&1 &
i=0; until wget -q -O /dev/null http://$R/v2/; do i=$((i+1)); [ $i -gt 300 ] && { echo "FAIL registry"; cat /var/reg.log; break; }; sleep 0.2; done
up() { cut -d' ' -f1 /proc/uptime; }
ms() { awk -v a=$1 -v b=$(up) 'BEGIN{printf "%d", (b-a)*1000}'; }
PM="podman --root /var/pm/root --runroot /run/pm --runtime $H --cgroup-manager cgroupfs --events-backend file --storage-driver overlay"
for n in $(seq @N@); do
    $H rmi $I >/dev/null 2>&1; $H image prune >/dev/null 2>&1
    s=$(up); $H run --net none $I -- true || echo "FAIL husk run cold"; echo "BENCH husk-cold-ms $(ms $s)"
    s=$(up); $H run --net none $I -- true || echo "FAIL husk run warm"; echo "BENCH husk-warm-ms $(ms $s)"
    $PM rmi -af >/dev/null 2>&1
    s=$(up); $PM run --rm --tls-verify=false --network none $I true || echo "FAIL podman run cold"; echo "BENCH podman-cold-ms $(ms $s)"
    s=$(up); $PM run --rm --network none $I true || echo "FAIL podman run warm"; echo "BENCH podman-warm-ms $(ms $s)"
done
EOS
)
    script=${script//@HUSK@/$husk}
    script=${script//@STORAGE@/$work/storage}
    script=${script//@N@/$VM_N}
    files=("$husk" "$target/release/husk-vmm" "$target/husk/vmlinux" "$target/husk/agent.cpio"
           "$(command -v docker-registry)" "$(command -v podman)" "$(command -v conmon)"
           /etc/containers /etc/ssl/certs/ca-certificates.crt "$work/storage")
    cargo run --release -q -p husk-tests --example testhost-run -- --mem 4096 --timeout 3000 \
        "$script" "${files[@]}" > "$work/vm.out"
    if grep -q FAIL "$work/vm.out"; then
        echo "test-host part failed:" >&2; cat "$work/vm.out" >&2; exit 1
    fi
    get() { sed -n "s/^BENCH $1 //p" "$work/vm.out" | median; }
    hc=$(get husk-cold-ms) hw=$(get husk-warm-ms) pc=$(get podman-cold-ms) pw=$(get podman-warm-ms)
    [[ -n $hc && -n $hw && -n $pc && -n $pw ]] || { echo "missing results:" >&2; cat "$work/vm.out" >&2; exit 1; }
    echo "BENCH vm-husk-run-cold-ms $hc"
    echo "BENCH vm-husk-run-warm-ms $hw"
    echo "BENCH vm-podman-run-cold-ms $pc"
    echo "BENCH vm-podman-run-warm-ms $pw"
    echo "BENCH vm-cold-ratio-husk/podman $(ratio "$hc" "$pc")"
    echo "BENCH vm-warm-ratio-husk/podman $(ratio "$hw" "$pw")"
    echo "run of the $image_mib MiB image in the test host (husk VMs = L2 under KVM in the nested test host;" \
         "podman with --runtime husk), median of $VM_N:"
    echo "  cold (pull + unpack + boot): husk run $hc ms, podman run $pc ms; husk/podman $(ratio "$hc" "$pc")x"
    echo "  warm (boot only):            husk run $hw ms, podman run $pw ms; husk/podman $(ratio "$hw" "$pw")x"
fi
