#!/usr/bin/env bash
# virtio-net benchmarks: TCP stream each way and a request/response rate between L1 and a
# husk-vmm guest on a tap, against the same over a veth pair between two network namespaces
# (what a runc pod gets), in one test-host run, printed as ratios.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/tests/build-artifacts.sh"
cd "$root"
cargo run --release -q -p husk-tests --example bench_net
