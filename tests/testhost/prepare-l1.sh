#!/bin/sh
# Prepares the assets of the "L1" test host: Debian's cloud kernel and the three modules that
# turn QEMU's emulated AMD SVM CPU into a real /dev/kvm inside a TCG VM (see
# shared/kvm-on-this-machine.md for why the local /dev/kvm cannot be used to boot Linux).
#
# The kernel package is downloaded and unpacked, never installed, so the host's own kernel and
# /boot stay untouched. Idempotent: a second run only checks the cached files.
#
# Output: the asset directory on stdout (vmlinuz + modules/{irqbypass,kvm,kvm-amd}.ko,
# modules/overlay.ko where overlayfs is a module, and modules/net/: what pod networking tests
# load (bridge, veth, tun, tc ingress and mirred, netfilter for CNI's NAT and port maps) with
# their dependencies, and `order`, the load order).
# Everything else goes to stderr.
set -eu

log() { echo "prepare-l1: $*" >&2; }

cache_root=${HUSK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/husk}
base="$cache_root/testhost"

# Host tools the test host needs: qemu for L1 and busybox-static for L1's userland.
need_pkgs=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_pkgs="$need_pkgs qemu-system-x86"
# Any busybox will do (the harness brings a dynamic one's libraries along); static preferred.
command -v busybox >/dev/null 2>&1 || need_pkgs="$need_pkgs busybox-static"
if [ -n "$need_pkgs" ]; then
    log "installing$need_pkgs"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q $need_pkgs >&2 || { apt-get update -q >&2 && apt-get install -y -q $need_pkgs >&2; }
fi

# Fast path: the meta package's target was resolved after apt's lists last changed and its
# assets are complete (apt-cache alone takes ~1 s).
current="$base/current"
if [ -f "$current" ] && [ ! /var/lib/apt/lists -nt "$current" ]; then
    dir="$base/$(cat "$current")"
    if [ -f "$dir/.complete-4" ]; then
        echo "$dir"
        exit 0
    fi
fi

# Slow path: one preparer at a time (parallel test processes may all start here).
mkdir -p "$base"
exec 9>"$base/.lock"
flock 9

# Which versioned image the meta package points at right now.
resolve() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n 1
}
pkg=$(resolve)
if [ -z "$pkg" ]; then
    log "apt-cache does not know linux-image-cloud-amd64; running apt-get update"
    apt-get update -q >&2
    pkg=$(resolve)
fi
[ -n "$pkg" ] || { log "cannot resolve linux-image-cloud-amd64"; exit 1; }
ver=$(apt-cache show "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
[ -n "$ver" ] || { log "no version for $pkg"; exit 1; }

dir="$base/$pkg-$ver"
if [ -f "$dir/.complete-4" ]; then
    echo "$pkg-$ver" >"$current"
    echo "$dir"
    exit 0
fi

log "fetching $pkg $ver into $dir"
work="$base/.work.$$"
dl=$(mktemp -d)
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work" "$dl"' EXIT
# apt drops privileges to _apt for the download; let it write there.
chmod 777 "$dl"
(
    cd "$dl"
    apt-get download "$pkg=$ver" >&2 || { apt-get update -q >&2 && apt-get download "$pkg=$ver" >&2; }
)
deb=$(ls "$dl"/*.deb)
dpkg-deb -x "$deb" "$work/x"

mkdir -p "$work/out/modules"
kver=${pkg#linux-image-}
cp "$work/x/boot/vmlinuz-$kver" "$work/out/vmlinuz"
mods="$work/x/lib/modules/$kver/kernel"
for m in virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd; do
    name=$(basename "$m")
    if [ -f "$mods/$m.ko" ]; then
        cp "$mods/$m.ko" "$work/out/modules/$name.ko"
    elif [ -f "$mods/$m.ko.xz" ]; then
        # busybox insmod cannot read xz-compressed modules.
        xz -dc "$mods/$m.ko.xz" >"$work/out/modules/$name.ko"
    elif [ -f "$mods/$m.ko.zst" ]; then
        zstd -dc "$mods/$m.ko.zst" >"$work/out/modules/$name.ko"
    else
        log "module $m not found in $pkg"
        exit 1
    fi
done
# Optional modules some jobs use (containerd's overlayfs snapshotter), when the kernel has
# them as modules rather than built in.
for m in fs/overlayfs/overlay; do
    name=$(basename "$m")
    if [ -f "$mods/$m.ko" ]; then
        cp "$mods/$m.ko" "$work/out/modules/$name.ko"
    elif [ -f "$mods/$m.ko.xz" ]; then
        xz -dc "$mods/$m.ko.xz" >"$work/out/modules/$name.ko"
    fi
done
# Networking modules (REDIRECT: husk's loopback forward in a pod namespace; conntrack netlink:
# portmap's flush of stale UDP entries), each after what it depends on (the `depends=` of its .modinfo; the
# extracted package has no modules.dep and busybox has no modprobe).
net_modules="bridge veth tun sch_ingress act_mirred cls_u32 cls_flower
    nf_tables nft_compat nft_chain_nat nft_nat nft_masq nft_ct nf_nat nf_conntrack
    x_tables ip_tables iptable_nat iptable_filter ip6_tables ip6table_nat
    xt_nat xt_MASQUERADE xt_conntrack xt_comment xt_mark xt_multiport xt_addrtype xt_tcpudp
    xt_REDIRECT nft_redir nf_conntrack_netlink"
mkdir -p "$work/out/modules/net"
: >"$work/out/modules/net/order"
add_net() {
    # dash's `local`: the recursion would clobber the caller's f and d otherwise.
    local f d
    grep -qx "$1" "$work/out/modules/net/order" && return 0
    f=$(find "$mods" -name "$1.ko" | head -n 1)
    [ -n "$f" ] || { log "module $1 not in $pkg (built in?)"; return 0; }
    for d in $(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '); do
        add_net "$d"
    done
    cp "$f" "$work/out/modules/net/$1.ko"
    echo "$1" >>"$work/out/modules/net/order"
}
for m in $net_modules; do add_net "$m"; done
echo "$pkg $ver" >"$work/out/version"

rm -rf "$dir"
mv "$work/out" "$dir"
touch "$dir/.complete-4"
echo "$pkg-$ver" >"$current"
log "ready"
echo "$dir"
