#!/usr/bin/env bash
# Shim benchmarks in one test-host run, through one containerd's CRI plugin: pod ready and an
# ExecSync round trip with containerd-shim-husk-v2 vs containerd's runc shim (with runc, and
# with husk as its binary); the shim's and VMM's host memory per pod.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/tests/build-artifacts.sh"
cd "$root"
cargo run --release -q -p husk-tests --example bench_shim
