//! Guest PID 1 for VMM tests. It mounts /proc, prints one marker line with what the guest sees,
//! then does what `husk.test=` on the kernel command line asks:
//! `poweroff` (default), `panic` (init exits, so the kernel panics), `reboot`, `hang`, or
//! `vsock` (echo servers and guest-to-host checks, see [`vsock_checks`]), or `fs` (virtio-fs
//! file operations, see [`fs_checks`]), or `bench` (device benchmarks, see [`bench`]); these
//! power off afterwards. `snapshot` is for snapshot tests: it prints a ready line with a
//! random token, then echoes each console line it reads with that token (so a restored VM
//! shows it kept its memory), how often the kernel reseeded its RNG for a VM fork (VMGenID)
//! and 16 fresh random bytes (so restored siblings show they differ), and powers off on `bye`;
//! on `check` it first waits up to 5 s for that reseed.
//!
//! Static and std + libc only so it runs from a bare initramfs.

mod bench;
mod fs_checks;
mod vsock_checks;

use std::ffi::CString;
use std::io::Write;

const MARKER: &str = "HUSK-TEST-INIT-READY";

fn mount(src: &str, target: &str, fstype: &str) {
    let (s, t, f) = match (CString::new(src), CString::new(target), CString::new(fstype)) {
        (Ok(s), Ok(t), Ok(f)) => (s, t, f),
        _ => return,
    };
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
}

fn online_cpus() -> i64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

fn cmdline_action() -> String {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    cmdline.split_whitespace().find_map(|w| w.strip_prefix("husk.test=")).unwrap_or("poweroff").to_string()
}

fn mem_total_kib() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string()))
        .unwrap_or_default()
}

/// Lines in the kernel log saying the crng was reseeded because the VM was forked.
fn vm_forks() -> usize {
    // SAFETY: SYSLOG_ACTION_SIZE_BUFFER takes no buffer.
    let size = unsafe { libc::klogctl(10, std::ptr::null_mut(), 0) };
    let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0).clamp(4096, 1 << 20)];
    // SAFETY: SYSLOG_ACTION_READ_ALL writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::klogctl(3, buf.as_mut_ptr().cast(), buf.len() as libc::c_int) };
    let log = &buf[..usize::try_from(n).unwrap_or(0).min(buf.len())];
    String::from_utf8_lossy(log).matches("crng reseeded due to virtual machine fork").count()
}

/// 16 bytes from the kernel's RNG, as hex.
fn random_hex() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Ready line, then one reply per console line until `bye` or end of input.
fn snapshot_echo() {
    let mut token = [0u8; 8];
    // SAFETY: getrandom writes at most `token.len()` bytes into `token`.
    unsafe { libc::getrandom(token.as_mut_ptr().cast(), token.len(), 0) };
    let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
    println!("HUSK-SNAPSHOT-READY token={token}");
    let mut line = String::new();
    loop {
        line.clear();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let got = line.trim();
        let mut forks = vm_forks();
        for _ in 0..100 {
            if got != "check" || forks > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            forks = vm_forks();
        }
        println!(
            "HUSK-SNAPSHOT-ECHO token={token} got={got} uptime={} vm_forks={forks} random={}",
            uptime(),
            random_hex()
        );
        if got == "bye" {
            return;
        }
    }
}

fn main() {
    std::fs::create_dir_all("/proc").ok();
    std::fs::create_dir_all("/sys").ok();
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    let action = cmdline_action();
    let rng = std::fs::read_to_string("/sys/class/misc/hw_random/rng_current").unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{MARKER} cpus={} mem_kib={} uptime={} rng={} action={action}",
        online_cpus(),
        mem_total_kib(),
        uptime(),
        rng.trim(),
    );
    let _ = out.flush();
    drop(out);
    // SAFETY: sync(2) takes no arguments and only flushes filesystem buffers.
    unsafe { libc::sync() };
    match action.as_str() {
        "panic" => std::process::exit(7),
        "reboot" => {
            // SAFETY: reboot(2) takes no pointers; as PID 1 of a throwaway test VM, with the
            // marker flushed and synced above, restarting the machine loses nothing.
            unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        }
        "vsock" | "fs" | "bench" => {
            match action.as_str() {
                "vsock" => vsock_checks::run(),
                "fs" => fs_checks::run(),
                _ => bench::run(),
            }
            // SAFETY: reboot(2) takes no pointers; the checks have finished and printed their
            // results, so powering off this PID 1's test VM loses nothing.
            unsafe { libc::reboot(libc::RB_POWER_OFF) };
        }
        "snapshot" => {
            snapshot_echo();
            // SAFETY: reboot(2) takes no pointers; the test is over.
            unsafe { libc::reboot(libc::RB_POWER_OFF) };
        }
        "hang" => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        _ => {
            // SAFETY: reboot(2) takes no pointers; as PID 1 of a throwaway test VM, with the
            // marker flushed and synced above, powering off loses nothing.
            unsafe { libc::reboot(libc::RB_POWER_OFF) };
        }
    }
    // reboot(2) only returns on failure; exiting makes the kernel panic, which tests would see.
    eprintln!("husk-test-init: reboot({action}) failed: {}", std::io::Error::last_os_error());
    std::process::exit(1);
}
