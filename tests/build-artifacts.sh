#!/usr/bin/env bash
# Builds everything the tests and the demo use, installing what a fresh Debian machine lacks:
#   target/<profile>/husk-*       workspace binaries
#   target/husk/vmlinux, bzImage  the guest kernel (cached outside the clone by its config hash)
#   target/husk/test-init.cpio    guest initramfs with the static test init
#   target/husk/agent.cpio        guest initramfs with husk-agent as /init
# and the test host's L1 kernel (cached). Safe to run repeatedly; cached steps are instant.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
out="$target/husk"
mkdir -p "$out"

log() { printf '==> %s\n' "$*" >&2; }

# Debian packages: the test host (QEMU, busybox), the guest kernel build, and test peers.
need_pkgs=()
for p in qemu-system-x86 busybox-static linux-source-6.1 flex bison bc libelf-dev build-essential cpio util-linux \
         file libseccomp-dev runc crun containerd podman conmon umoci containernetworking-plugins iptables \
         docker-registry skopeo libcap2-bin zstd ca-certificates libssl-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing packages (${need_pkgs[*]}); run as root or install them"; exit 1
    fi
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2 \
        || { apt-get update >&2 && apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2; }
fi

log "guest kernel"
kdir="$(dirname "$("$root/guest-kernel/build.sh")")"
for f in vmlinux bzImage; do
    [[ -f "$kdir/$f" ]] || { log "guest kernel build did not produce $f"; exit 1; }
    cmp -s "$kdir/$f" "$out/$f" || cp -f "$kdir/$f" "$out/$f"
done

log "workspace binaries"
cargo build --release --workspace --all-targets >&2

log "static guest binaries"
# libseccomp-sys links the shared library unless told otherwise, which would leave the agent
# dynamically linked without a word.
LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --target x86_64-unknown-linux-gnu -p husk-test-init -p husk-agent >&2
gbin="$target/x86_64-unknown-linux-gnu/release"
for b in husk-test-init husk-agent husk-pause husk-udp-echo husk-tcp-hello; do
    file -L "$gbin/$b" | grep -q 'static' || { log "$b is not statically linked"; exit 1; }
done
"$target/release/husk-rootfs-builder" --output "$out/test-init.cpio" --init "$gbin/husk-test-init"
"$target/release/husk-rootfs-builder" --output "$out/agent.cpio" --init "$gbin/husk-agent"

log "test host (L1) kernel"
"$root/tests/testhost/prepare-l1.sh" >/dev/null

log "artifacts ready in $out"
