//! Revives a nested test host whose vCPU sleeps through a pending interrupt.
//!
//! Seen in stalled runs: QEMU (TCG, one vCPU in its own thread) has its vCPU thread waiting on
//! its halt condition and its main loop polling with no timer due for hours, while the L1
//! kernel waits for a timer interrupt: the wake-up of a halted vCPU was lost. Anything that
//! kicks the vCPU makes it look at its pending interrupts again; pausing and resuming the VM
//! over QMP kicks every vCPU and is harmless to a healthy guest.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

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
    fn no_socket_is_no_kick() {
        assert!(!kick(Path::new("/nonexistent/qmp.sock")));
    }
}
