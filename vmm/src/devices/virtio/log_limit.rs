//! Rate limits for warnings a guest can set off at will: hitting a bound in a loop must not
//! flood the host's log, yet the first hit (and how many followed) should be seen.

use std::time::{Duration, Instant};

/// At most one warning of a kind per this long.
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// One kind of warning. Not thread-safe: devices keep theirs in their worker's state (or
/// behind a lock).
#[derive(Debug, Default)]
pub struct LogLimit {
    last: Option<Instant>,
    held_back: u64,
}

impl LogLimit {
    pub const fn new() -> Self {
        Self { last: None, held_back: 0 }
    }

    /// `Some(n)` when this occurrence should be logged, `n` being how many were held back
    /// since the last logged one; `None` (and counted) otherwise.
    pub fn check(&mut self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < LOG_INTERVAL => {
                self.held_back = self.held_back.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_interval_with_a_count_of_the_rest() {
        let mut l = LogLimit::new();
        let t0 = Instant::now();
        assert_eq!(l.check_at(t0), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.check_at(t0 + Duration::from_millis(10)), None);
        }
        assert_eq!(l.check_at(t0 + LOG_INTERVAL), Some(1000));
        assert_eq!(l.check_at(t0 + LOG_INTERVAL), None);
    }
}
