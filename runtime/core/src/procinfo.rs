//! Host processes husk left behind (VMMs, relays), recognised by PID plus start time so that a
//! reused PID is never taken for them.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The start time (clock ticks since boot) of `pid`, unless it is gone or a zombie.
pub fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    parse_stat(&stat)
}

/// Fields after the command name (which may hold spaces and parentheses): state is the first,
/// starttime the 20th.
fn parse_stat(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X") | None) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether the process recorded as (`pid`, `start`) is still running.
pub fn alive(pid: i32, start: u64) -> bool {
    start_time(pid) == Some(start)
}

/// Sends `signal` to the recorded process if it is still the one recorded.
pub fn signal(pid: i32, start: u64, signal: nix::sys::signal::Signal) -> bool {
    alive(pid, start) && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).is_ok()
}

/// Waits until the recorded process has exited (a zombie counts), at most `limit`; whether it
/// has. Woken by the exit itself (a pidfd), not by polling.
pub async fn wait_exit(pid: i32, start: u64, limit: std::time::Duration) -> bool {
    use std::os::fd::{FromRawFd, OwnedFd};
    if !alive(pid, start) {
        return true;
    }
    // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        // Gone between the two looks (ESRCH), or no pidfd on this kernel: poll instead.
        return poll_exit(pid, start, limit).await;
    }
    // SAFETY: a fresh fd from pidfd_open that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The PID may have been reused before the pidfd was opened: it must still be the recorded one.
    if !alive(pid, start) {
        return true;
    }
    // SAFETY: `fd` is owned by the AsyncFd until it drops, and is never closed elsewhere.
    match unsafe { tokio::io::unix::AsyncFd::register(fd) } {
        Ok(afd) => match tokio::time::timeout(limit, afd.readable()).await {
            Ok(_) => true,
            Err(_) => !alive(pid, start),
        },
        Err(_) => poll_exit(pid, start, limit).await,
    }
}

async fn poll_exit(pid: i32, start: u64, limit: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while alive(pid, start) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    true
}

/// The live processes (PID, start time) with `arg` as one of their command-line arguments: how
/// a process that was started but never recorded (its starter killed in between) is found.
pub fn with_arg(arg: &OsStr) -> Vec<(i32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
        })
        .filter_map(|pid| Some((pid, start_time(pid)?)))
        .collect()
}

/// Marks every inherited descriptor from 3 up close-on-exec, so long-lived children (VMM,
/// relays) never hold a caller's pipe open: a client waiting for EOF on one would hang.
/// Async-signal-safe: meant for `pre_exec`.
pub fn cloexec_from_3() {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range(2) only changes descriptor flags of this (forked) process.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_exit_is_seen_when_it_happens_and_a_live_process_times_out() {
        let mut child = std::process::Command::new("sleep").arg("0.3").spawn().expect("sleep");
        let pid = child.id() as i32;
        let start = start_time(pid).expect("start time");
        let t = std::time::Instant::now();
        assert!(!wait_exit(pid, start, std::time::Duration::from_millis(50)).await, "still running");
        assert!(wait_exit(pid, start, std::time::Duration::from_secs(10)).await);
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{:?}", t.elapsed());
        // A zombie has exited; so has a PID recorded with another start time.
        assert!(wait_exit(pid, start, std::time::Duration::ZERO).await);
        child.wait().expect("reap");
        assert!(wait_exit(std::process::id() as i32, 1, std::time::Duration::ZERO).await);
    }

    #[test]
    fn parses_stat_with_odd_names() {
        let s = "123 (a) b (c)) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 4567 1000 10";
        assert_eq!(parse_stat(s), Some(4567));
        let z = "123 (x) Z 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 4567 1000 10";
        assert_eq!(parse_stat(z), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn processes_are_found_by_an_argument() {
        use std::os::unix::process::CommandExt;
        let marker = format!("husk-procinfo-test-{}", std::process::id());
        let mut child = std::process::Command::new("sleep").arg0(&marker).arg("30").spawn().expect("sleep");
        // Its command line shows a moment after spawn returns (the exec is still finishing).
        let mut found = Vec::new();
        for _ in 0..250 {
            found = with_arg(OsStr::new(&marker));
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found.iter().map(|f| f.0).collect::<Vec<_>>(), [child.id() as i32]);
        assert!(with_arg(OsStr::new("husk-procinfo-no-such-argument")).is_empty());
    }

    #[test]
    fn this_process_is_alive() {
        let me = std::process::id() as i32;
        let start = start_time(me).expect("own start time");
        assert!(alive(me, start));
        assert!(!alive(me, start + 1));
        assert!(!alive(-1, 0));
    }
}
