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

/// Orders for `rounds` rounds of `n` interleaved benchmark runs, in which each run follows
/// every other about equally often (a Williams design: over each `n` rounds, `2n` when `n` is
/// odd, every ordered pair of neighbours occurs exactly once). Turning one order round by
/// round would not do that: each run would always follow the same one.
pub fn balanced_orders(n: usize, rounds: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new(); rounds];
    }
    // 0, n-1, 1, n-2, 2, ...: the differences between neighbours (mod n) are all distinct.
    let mut first = Vec::with_capacity(n);
    let (mut lo, mut hi) = (0, n);
    for i in 0..n {
        if i % 2 == 0 {
            first.push(lo);
            lo += 1;
        } else {
            hi -= 1;
            first.push(hi);
        }
    }
    let mut square: Vec<Vec<usize>> = (0..n).map(|r| first.iter().map(|x| (x + r) % n).collect()).collect();
    if n % 2 == 1 {
        let reversed: Vec<Vec<usize>> =
            square.iter().map(|row| row.iter().rev().copied().collect()).collect();
        square.extend(reversed);
    }
    square.iter().cycle().take(rounds).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::balanced_orders;
    use std::collections::HashMap;

    #[test]
    fn every_run_follows_every_other_once_per_square() {
        for n in 1..=6 {
            let square = if n % 2 == 0 { n } else { 2 * n };
            let orders = balanced_orders(n, square);
            assert_eq!(orders.len(), square);
            let mut pairs: HashMap<(usize, usize), usize> = HashMap::new();
            for row in &orders {
                let mut sorted = row.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n={n}: {row:?} is not a permutation");
                for w in row.windows(2) {
                    *pairs.entry((w[0], w[1])).or_default() += 1;
                }
            }
            let each = if n % 2 == 0 { 1 } else { 2 };
            assert_eq!(pairs.len(), n * (n - 1), "n={n}: {orders:?}");
            assert!(pairs.values().all(|&c| c == each), "n={n}: {pairs:?}");
        }
    }

    #[test]
    fn rounds_past_the_square_repeat_it() {
        let orders = balanced_orders(4, 10);
        assert_eq!(orders.len(), 10);
        assert_eq!(orders[4], orders[0]);
        assert_eq!(orders[0], vec![0, 3, 1, 2]);
        assert!(balanced_orders(0, 3).iter().all(Vec::is_empty));
    }
}
