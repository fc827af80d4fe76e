#!/usr/bin/env bash
# Agent benchmarks: agent readiness, container create+start+wait vs the agent in host mode and
# vs runc/crun on the host, stdout stream throughput vs a host pipe, agent RSS; one test-host run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/tests/build-artifacts.sh"
cd "$root"
cargo run --release -q -p husk-tests --example bench_agent
