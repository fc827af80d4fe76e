//! husk test host: runs test scripts where a real KVM is available.
//!
//! Tests that need KVM describe their work as a [`Job`] (a shell script plus the host files it
//! uses) and call [`run_job`]. On a machine with hardware KVM the script runs directly; on the
//! development machines, whose `/dev/kvm` is nested PVM and cannot boot Linux guests usefully,
//! it runs inside an L1 Linux VM under QEMU TCG that provides a real `/dev/kvm` (see
//! [`testhost`] and `testhost/prepare-l1.sh`). Tests skip, printing why, where neither works:
//! start them with [`require_testhost!`].
//!
//! Environment knobs, all for debugging:
//! - `HUSK_TESTHOST=direct|nested|auto` forces how jobs run.
//! - `HUSK_TESTHOST_KEEP=1` keeps each job's scratch dir (initramfs, console and output logs).
//! - `HUSK_L1_ASSETS=<dir>` uses that L1 kernel/modules dir instead of running the script.
//! - `HUSK_CACHE_DIR` moves the cache (default `$XDG_CACHE_HOME/husk` or `~/.cache/husk`).
//!
//! `cargo run -p husk-tests --example testhost-run -- 'script' [files]` runs one job by hand.

pub mod artifacts;
pub mod error;
pub mod initramfs;
pub mod l1_assets;
pub mod l1_kick;
pub mod testhost;

pub use error::TestHostError;
pub use initramfs::{which, Initramfs};
pub use l1_assets::{l1_assets, L1Assets};
pub use testhost::{kvm_mode, run_job, unavailable_reason, Job, JobOutput, KvmMode, L1Timings};

/// `BENCH <key> <number>` lines from a benchmark job's output.
pub fn bench_values(output: &str) -> std::collections::BTreeMap<String, f64> {
    let mut m = std::collections::BTreeMap::new();
    for l in output.lines().filter_map(|l| l.strip_prefix("BENCH ")) {
        let mut f = l.split_whitespace();
        if let (Some(k), Some(Ok(v))) = (f.next(), f.next().map(str::parse)) {
            m.insert(k.to_string(), v);
        }
    }
    m
}
