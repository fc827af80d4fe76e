#!/usr/bin/env bash
# Builds husk's guest kernel: an uncompressed ELF `vmlinux` that boots through its PVH note,
# and the same kernel as a bzImage (next to it) for the Linux boot protocol.
#
# Linux 6.1 from Debian's linux-source-6.1, `make tinyconfig` + husk.config (next to this
# script) + `make olddefconfig`, then `make vmlinux`. The result is cached under
#   ${HUSK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/husk}/guest-kernel/<hash>/vmlinux
# where <hash> covers husk.config, this script and the linux-source-6.1 package version, so a
# second run is instant.
#
# Usage: build.sh                 build if needed; print the vmlinux path
#        build.sh --print-path    print the cached path without building; exit 1 if absent
#
# stdout carries only the vmlinux path. Everything else goes to stderr, and the build's own
# output to <hash>/build.log (its tail is shown on failure).
#
# Environment: HUSK_CACHE_DIR, XDG_CACHE_HOME (cache location), HUSK_KERNEL_JOBS (make -j,
# default nproc), HUSK_KERNEL_KEEP_TREE=1 (keep the build tree in <hash>/src for debugging).
set -Eeuo pipefail

# Keep stdout for the final path only: fd 3 is the real stdout, everything else goes to stderr.
exec 3>&1 1>&2

log() { echo "guest-kernel: $*" >&2; }
die() { log "error: $*"; exit 1; }

script=$(readlink -f "${BASH_SOURCE[0]}")
here=$(dirname "$script")
fragment=$here/husk.config
src_pkg=linux-source-6.1
tarball=/usr/src/$src_pkg.tar.xz

mode=build
case "${1:-}" in
    "") ;;
    --print-path) mode=print ;;
    -h | --help) sed -n '2,17p' "$script" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
esac
[ $# -le 1 ] || die "too many arguments (try --help)"
[ -f "$fragment" ] || die "missing $fragment"

cache_root=$(readlink -m "${HUSK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/husk}")

pkg_version() { dpkg-query -W -f='${Status} ${Version}\n' "$src_pkg" 2>/dev/null | awk '$3 == "installed" { print $4 }'; }

cache_dir_for() { # $1 = package version
    local h
    h=$({ printf 'fragment\n'; cat "$fragment"; printf 'script\n'; cat "$script"; printf 'pkg %s\n' "$1"; } |
        sha256sum | cut -c1-16)
    echo "$cache_root/guest-kernel/$h"
}

# --- --print-path and the fast path: no package checks, no locking ---------------------------
version=$(pkg_version || true)
if [ "$mode" = print ]; then
    [ -n "$version" ] || { log "$src_pkg is not installed, so no cached kernel can match"; exit 1; }
    out=$(cache_dir_for "$version")/vmlinux
    echo "$out" >&3
    [ -f "$out" ] || { log "not built yet: $out"; exit 1; }
    exit 0
fi
if [ -n "$version" ] && [ -f "$tarball" ]; then
    out=$(cache_dir_for "$version")/vmlinux
    if [ -f "$out" ]; then echo "$out" >&3; exit 0; fi
fi

# --- Build prerequisites -------------------------------------------------------------------------
[ "$(uname -m)" = x86_64 ] || die "only x86_64 build hosts are supported (this is $(uname -m))"

missing=()
[ -n "$version" ] && [ -f "$tarball" ] || missing+=("$src_pkg")
for tool in flex:flex bison:bison bc:bc gcc:build-essential make:build-essential \
    ld:binutils readelf:binutils strip:binutils xz:xz-utils; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
[ -f /usr/include/gelf.h ] || missing+=(libelf-dev)
[ -f /usr/include/stdio.h ] || missing+=(build-essential)
if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
        { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
    version=$(pkg_version || true)
    [ -n "$version" ] && [ -f "$tarball" ] || die "$src_pkg installed but $tarball is missing"
fi

dir=$(cache_dir_for "$version")
out=$dir/vmlinux
mkdir -p "$dir"

# Parallel callers (e.g. test binaries) build once; the others wait and reuse the result.
exec 9>"$dir/.lock"
if ! flock -n 9; then
    log "another build of $dir is running; waiting for it"
    flock 9
fi
if [ -f "$out" ]; then echo "$out" >&3; exit 0; fi

logfile=$dir/build.log
: >"$logfile"
src=$dir/src
step() { log "$*"; printf '\n=== %s\n' "$*" >>"$logfile"; }
drop_tree() { # the extracted tree is ~1 GB once built; keep it only on request
    cd "$dir"
    if [ "${HUSK_KERNEL_KEEP_TREE:-0}" != 1 ]; then rm -rf "$src"; fi
}
on_error() {
    local rc=$?
    trap - ERR
    log "build failed (exit $rc); last lines of $logfile:"
    tail -n 40 "$logfile" >&2 || true
    drop_tree
    exit "$rc"
}
trap on_error ERR

start=$(date +%s)
jobs=${HUSK_KERNEL_JOBS:-$(nproc)}
# Reproducible-ish build metadata (shows up in /proc/version).
export KBUILD_BUILD_USER=husk KBUILD_BUILD_HOST=husk
kmake() { make -C "$src" ARCH=x86_64 "$@" >>"$logfile" 2>&1; }

step "extracting $tarball ($src_pkg $version)"
rm -rf "$src"
mkdir -p "$src"
tar -xJf "$tarball" -C "$src" --strip-components=1 >>"$logfile" 2>&1

step "configuring: tinyconfig + $(basename "$fragment") + olddefconfig"
kmake tinyconfig
cd "$src"
./scripts/kconfig/merge_config.sh -m .config "$fragment" >>"$logfile" 2>&1
cd "$dir"
kmake olddefconfig
cp "$src/.config" "$dir/config"

# olddefconfig drops requested options whose dependencies are unmet without a word: check that
# every line of the fragment made it into the final .config.
step "checking the final .config against $(basename "$fragment")"
bad=()
while IFS= read -r line || [ -n "$line" ]; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        name=${BASH_REMATCH[1]}
        if ! grep -qxF -- "$line" "$src/.config"; then
            have=$(grep -E "^$name=|^# $name is not set" "$src/.config" || true)
            bad+=("wanted $line, got ${have:-nothing (symbol unknown or hidden)}")
        fi
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        name=${BASH_REMATCH[1]}
        if have=$(grep -E "^$name=[ym]$" "$src/.config"); then
            bad+=("wanted $name off, got $have (selected by another option)")
        fi
    fi
done <"$fragment"
# The crypto API is not built at all today; should something pull it in, its boot-time self
# tests must stay off.
if grep -qx 'CONFIG_CRYPTO=y' "$src/.config" && ! grep -qx 'CONFIG_CRYPTO_MANAGER_DISABLE_TESTS=y' "$src/.config"; then
    bad+=("CONFIG_CRYPTO=y without CONFIG_CRYPTO_MANAGER_DISABLE_TESTS=y")
fi
if [ ${#bad[@]} -gt 0 ]; then
    trap - ERR
    log "the final .config does not match $fragment:"
    printf '  %s\n' "${bad[@]}" >&2
    log "full config: $dir/config"
    drop_tree
    exit 1
fi

step "make -j$jobs vmlinux bzImage (several minutes)"
kmake -j"$jobs" vmlinux bzImage
# The bzImage (Linux boot protocol path) sits next to vmlinux; vmlinux is installed last, so
# its presence means the whole cache entry is complete.
cp -f "$src/arch/x86/boot/bzImage" "$dir/bzImage"

step "installing $out"
strip --strip-debug -o "$dir/vmlinux.tmp" "$src/vmlinux" >>"$logfile" 2>&1
# The PVH entry point: ELF note owner "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY).
readelf -n "$dir/vmlinux.tmp" >>"$logfile" 2>&1
if ! readelf -n "$dir/vmlinux.tmp" 2>/dev/null |
    grep -Eq '^[[:space:]]*Xen[[:space:]]+0x[0-9a-f]+[[:space:]]+(.*0x0*12\)|NT_XEN.*PHYS32)'; then
    trap - ERR
    log "$dir/vmlinux.tmp has no Xen PVH note (type 18); is CONFIG_PVH set?"
    drop_tree
    exit 1
fi
mv -f "$dir/vmlinux.tmp" "$out"

trap - ERR
drop_tree
log "built in $(($(date +%s) - start)) s: $out ($(stat -c %s "$out") bytes)"
echo "$out" >&3
