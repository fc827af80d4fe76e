#!/usr/bin/env bash
# Runtime benchmarks in one test-host run: `husk run --rootfs DIR -- true` (sandbox mode) and
# `husk run` of an OCI bundle, each started from a VM snapshot (`husk snapshot prepare` first)
# and booted cold (`--no-snapshot`), vs `runc run` and `crun run` of the same bundle; agent
# readiness and the `--timings` breakdown in both modes; and the host memory of 10 idle
# sandboxes at once, cold vs restored (husk-vmm PSS and RSS, relay RSS).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/tests/build-artifacts.sh"
cd "$root"
cargo run --release -q -p husk-tests --example bench_runtime
