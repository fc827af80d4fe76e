//! Signal names and numbers as `kill` accepts them: `TERM`, `SIGTERM`, `sigterm`, `15`.

use crate::error::RuntimeError;

const NAMES: [(&str, i32); 31] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("IOT", libc::SIGIOT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("SYS", libc::SIGSYS),
];

/// Parses a signal as runc does; real-time signals as `RTMIN+N`/`RTMAX-N` too.
pub fn parse(s: &str) -> Result<i32, RuntimeError> {
    let bad = || RuntimeError::InvalidArgument(format!("unknown signal {s:?}"));
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) { Ok(n) } else { Err(bad()) };
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some((_, n)) = NAMES.iter().find(|(k, _)| *k == name) {
        return Ok(*n);
    }
    let (rtmin, rtmax) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let rt = if name == "RTMIN" {
        Some(rtmin)
    } else if name == "RTMAX" {
        Some(rtmax)
    } else if let Some(off) = name.strip_prefix("RTMIN+") {
        off.parse::<i32>().ok().map(|o| rtmin + o)
    } else if let Some(off) = name.strip_prefix("RTMAX-") {
        off.parse::<i32>().ok().map(|o| rtmax - o)
    } else {
        None
    };
    rt.filter(|n| (rtmin..=rtmax).contains(n)).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse("TERM").ok(), Some(15));
        assert_eq!(parse("SIGKILL").ok(), Some(9));
        assert_eq!(parse("sigusr1").ok(), Some(libc::SIGUSR1));
        assert_eq!(parse("9").ok(), Some(9));
        assert_eq!(parse("RTMIN+1").ok(), Some(libc::SIGRTMIN() + 1));
        for bad in ["", "0", "65", "-9", "SIGNOPE", "RTMIN+99", "TERM "] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
