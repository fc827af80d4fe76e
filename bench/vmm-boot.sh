#!/usr/bin/env bash
# Boot benchmark: husk-vmm vs qemu-system-x86_64 -M microvm, same kernel and initramfs, in one
# test-host run (nested KVM here; directly on a real KVM host), and husk-vmm confined (seccomp
# filters, --jail) against unconfined. Prints medians and ratios.
# HUSK_BENCH_RUNS sets the number of runs per VMM (default 7).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/tests/build-artifacts.sh"
cd "$root"
cargo build --release -p husk-vmm -p husk-tests --bins >&2
cargo run --release -q -p husk-tests --example bench_vmm_boot
