#!/usr/bin/env bash
# Leak check at length, in one test-host run: tests/tests/faults.rs's cycles only, HUSK_CYCLES
# (default 200) create/start/delete cycles one after another and HUSK_CYCLES/3 rounds of four
# at a time, while one sandbox stays up and gets an exec per cycle; prints its husk-vmm's
# descriptor count and RSS (with and without guest RAM) before and after, and fails if they
# grew. Nested, a sequential cycle took ~8 s and a round of four ~22 s: 200 take about an hour.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/tests/build-artifacts.sh"
cd "$root"
# The test prints every sample (`@@SAMPLE <cycle> fds= rss= own= ...`) and a summary line
# ("long-lived husk-vmm over ...").
HUSK_CYCLES="${HUSK_CYCLES:-200}" HUSK_TESTS_STRICT=1 \
    cargo test --release -q -p husk-tests --test faults -- --nocapture --test-threads=1
