//! Watches a nested test host for stalls and revives one whose vCPU sleeps through a pending interrupt.
//!
//! Seen in stalled runs: QEMU (TCG, one vCPU in its own thread) has its vCPU thread waiting on
//! its halt condition and its main loop polling with no timer due for hours, while the L1
//! kernel waits for a timer interrupt: the wake-up of a halted vCPU was lost. Anything that
//! kicks the vCPU makes it look at its pending interrupts again; pausing and resuming the VM
//! over QMP kicks every vCPU and is harmless to a healthy guest. Since L1 runs a periodic tick
//! (`L1_CMDLINE` in testhost.rs) this is the backstop, not the cure.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// What [`StallWatch::observe`] makes of the latest readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// QEMU used no CPU for the kick delay: kick its vCPU.
    Kick,
    /// QEMU uses CPU again after a kick.
    Revived,
    /// Give up on this L1 (the reason): no CPU even after a kick, or no output for too long.
    Stalled(String),
}

/// Watches a running L1 through QEMU's CPU time and the job's output length.
#[derive(Debug)]
pub struct StallWatch {
    kick_after: Duration,
    silent_after: Option<Duration>,
    ticks: Option<u64>,
    busy_at: Instant,
    kicked: bool,
    out_len: u64,
    grew_at: Instant,
}

impl StallWatch {
    /// `kick_after`: how long QEMU may use no CPU before a kick, and again after it before
    /// the L1 counts as stalled; `silent_after`: how long the job may print nothing.
    pub fn new(now: Instant, kick_after: Duration, silent_after: Option<Duration>) -> Self {
        Self { kick_after, silent_after, ticks: None, busy_at: now, kicked: false, out_len: 0, grew_at: now }
    }

    /// Takes QEMU's CPU ticks and the output's length at `now`; `finished`: the job's trailer
    /// arrived, after which only the power-off is left and nothing counts as a stall.
    pub fn observe(&mut self, now: Instant, ticks: Option<u64>, out_len: u64, finished: bool) -> Verdict {
        if out_len != self.out_len {
            (self.out_len, self.grew_at) = (out_len, now);
        }
        if ticks != self.ticks {
            (self.ticks, self.busy_at) = (ticks, now);
            if std::mem::take(&mut self.kicked) {
                return Verdict::Revived;
            }
        }
        if finished {
            return Verdict::Fine;
        }
        if now.duration_since(self.busy_at) > self.kick_after {
            if self.kicked {
                return Verdict::Stalled(format!(
                    "QEMU used no CPU for {:?}, then as long after a kick",
                    self.kick_after
                ));
            }
            (self.kicked, self.busy_at) = (true, now);
            return Verdict::Kick;
        }
        match self.silent_after {
            Some(limit) if now.duration_since(self.grew_at) > limit => {
                Verdict::Stalled(format!("no output for {limit:?}"))
            }
            _ => Verdict::Fine,
        }
    }
}

/// A QEMU process's CPU time (user + system) in clock ticks, if it is still there.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which may hold spaces: utime and stime are the 12th
    // and 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Pauses and resumes the VM through its QMP socket; true if QEMU accepted every command.
pub fn kick(qmp: &Path) -> bool {
    let run = || -> std::io::Result<bool> {
        let mut s = UnixStream::connect(qmp)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut line = String::new();
        // The greeting, then one answer per command.
        r.read_line(&mut line)?;
        let mut ok = true;
        for cmd in ["qmp_capabilities", "stop", "cont"] {
            s.write_all(format!("{{\"execute\": \"{cmd}\"}}\n").as_bytes())?;
            // Events (STOP, RESUME) may come before the answer.
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Ok(false);
                }
                if line.contains("\"return\"") || line.contains("\"error\"") {
                    ok &= line.contains("\"return\"");
                    break;
                }
            }
        }
        Ok(ok)
    };
    run().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_ticks_and_a_gone_one_none() {
        assert!(cpu_ticks(std::process::id()).is_some());
        assert_eq!(cpu_ticks(u32::MAX), None);
    }

    #[test]
    fn a_flat_qemu_is_kicked_then_given_up_on_and_a_busy_one_never() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut w = StallWatch::new(t0, Duration::from_secs(30), None);
        // Busy: never a kick, however long.
        for i in 0..100 {
            assert_eq!(w.observe(s(i * 10), Some(i), 0, false), Verdict::Fine);
        }
        // Flat from 990 s on: a kick after 30 s; it revives QEMU.
        assert_eq!(w.observe(s(1000), Some(99), 0, false), Verdict::Fine);
        assert_eq!(w.observe(s(1021), Some(99), 0, false), Verdict::Kick);
        assert_eq!(w.observe(s(1030), Some(100), 0, false), Verdict::Revived);
        // Flat again: a kick, and 30 s more of nothing is a stall.
        assert_eq!(w.observe(s(1061), Some(100), 0, false), Verdict::Kick);
        assert_eq!(w.observe(s(1080), Some(100), 0, false), Verdict::Fine);
        assert!(matches!(w.observe(s(1092), Some(100), 0, false), Verdict::Stalled(_)));
        // After the trailer only the power-off is left: no kick, no stall.
        let mut w = StallWatch::new(t0, Duration::from_secs(30), None);
        assert_eq!(w.observe(s(100), Some(5), 10, true), Verdict::Fine);
        assert_eq!(w.observe(s(1000), Some(5), 10, true), Verdict::Fine);
    }

    #[test]
    fn a_silent_job_is_a_stall_and_output_resets_the_clock() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut w = StallWatch::new(t0, Duration::from_secs(30), Some(Duration::from_secs(300)));
        for i in 0..60 {
            // Busy CPU, output growing every 100 s.
            assert_eq!(w.observe(s(i * 10), Some(i), i / 10, false), Verdict::Fine);
        }
        assert_eq!(w.observe(s(800), Some(80), 5, false), Verdict::Fine);
        assert!(
            matches!(w.observe(s(901), Some(90), 5, false), Verdict::Stalled(r) if r.contains("no output"))
        );
    }

    #[test]
    fn no_socket_is_no_kick() {
        assert!(!kick(Path::new("/nonexistent/qmp.sock")));
    }
}
