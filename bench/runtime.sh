#!/usr/bin/env bash
# Runtime benchmarks in one test-host run: `husk run <rootfs> true` (sandbox mode) and
# `husk run` of an OCI bundle vs `runc run` and `crun run` of the same bundle, and the host
# memory a running sandbox costs (husk-vmm + relay RSS).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/tests/build-artifacts.sh"
cd "$root"
cargo run --release -q -p husk-tests --example bench_runtime
