#!/usr/bin/env bash
# The test command: builds every artifact (installing missing Debian packages when root), then
# runs the whole test suite in strict mode, where a missing prerequisite fails instead of skipping.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
./tests/build-artifacts.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Release builds: inside the nested test host every VMM cycle costs ~10x, and device
# emulation in a debug build is slow enough to matter there.
HUSK_TESTS_STRICT=1 cargo test --release --workspace -- --test-threads=1 "$@"
