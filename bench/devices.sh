#!/usr/bin/env bash
# Device benchmarks: vsock and virtio-fs in a husk-vmm guest against the same operations on the
# host, measured in one test-host run and printed as ratios.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/tests/build-artifacts.sh"
cd "$root"
cargo run --release -q -p husk-tests --example bench_devices
