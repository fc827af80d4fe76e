//! Per-thread confinement of husk-vmm: every thread drops the capabilities it does not need and
//! installs the seccomp filter of its kind before the guest runs its first instruction. A thread
//! confines itself (capabilities and seccomp filters are per thread), so threads are started
//! from the unconfined main thread during set-up and never from a confined one, except the
//! loopback forwarder's connection threads, whose filter is their parent's.
//!
//! A syscall outside a thread's filter raises SIGSYS; the handler names the thread kind and the
//! syscall on stderr (the sandbox's `vmm.log`) and the process then dies by SIGSYS, which is
//! how husk tells a seccomp kill from any other death.

mod caps;
mod filters;

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::OnceLock;

use seccompiler::BpfProgram;
use serde::{Deserialize, Serialize};

/// What a thread does, which decides its syscalls and capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread's event loop (console input, exit), after set-up.
    Main,
    Vcpu,
    VirtioFs,
    VirtioVsock,
    VirtioNet,
    VirtioRng,
    /// The pod-loopback forwarder's listener and connection threads.
    LoopbackForward,
    /// The control socket's thread, which also writes snapshots.
    Control,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::VirtioFs,
        ThreadKind::VirtioVsock,
        ThreadKind::VirtioNet,
        ThreadKind::VirtioRng,
        ThreadKind::LoopbackForward,
        ThreadKind::Control,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::VirtioFs => "virtio-fs",
            ThreadKind::VirtioVsock => "virtio-vsock",
            ThreadKind::VirtioNet => "virtio-net",
            ThreadKind::VirtioRng => "virtio-rng",
            ThreadKind::LoopbackForward => "loopback-forward",
            ThreadKind::Control => "control",
        }
    }

    fn index(self) -> u8 {
        ThreadKind::ALL.iter().position(|k| *k == self).map_or(u8::MAX, |i| i as u8)
    }
}

/// What a seccomp filter does with a syscall outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompMode {
    /// SIGSYS: the VMM reports the syscall and dies.
    #[default]
    Enforce,
    /// Allowed but logged by the kernel (audit / `dmesg`): for finding what a filter misses.
    Log,
    /// No filter at all: debugging only.
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("building the {kind} seccomp filter: {source}")]
    Compile {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the {kind} seccomp filter: {source}")]
    Install {
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("dropping capabilities on the {kind} thread: {source}")]
    Caps {
        kind: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
}

#[derive(Debug)]
struct Policy {
    filters: HashMap<ThreadKind, Vec<BpfProgram>>,
}

static POLICY: OnceLock<Policy> = OnceLock::new();

thread_local! {
    /// The kind this thread confined itself as, for the SIGSYS report (a plain TLS read, which
    /// is safe in a signal handler).
    static KIND: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// Compiles every thread kind's filter and installs the SIGSYS reporter. Until this is called,
/// [`confine_thread`] only drops capabilities (unit tests, `--no-seccomp`).
pub fn enable(mode: SeccompMode) -> Result<(), ConfineError> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    // glibc's malloc opens files lazily, from whichever thread gets there first: it sizes its
    // arena pool from /sys/devices/system/cpu/online, and reads
    // /proc/sys/vm/overcommit_memory the first time it shrinks a thread's heap (the vsock
    // worker did, after a 64 MiB stream). Both would be an openat on a confined thread. A fixed
    // pool, large blocks mapped (and unmapped) on their own, and thread heaps never trimmed
    // mean neither happens.
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 8);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    if mode == SeccompMode::Off || POLICY.get().is_some() {
        // Filters are compiled once per process (tests build several VMs in one).
        return Ok(());
    }
    let mut filters = HashMap::new();
    for kind in ThreadKind::ALL {
        let prog = filters::compile(kind, mode, pid)
            .map_err(|source| ConfineError::Compile { kind: kind.name(), source })?;
        filters.insert(kind, prog);
    }
    install_sigsys_handler()?;
    let _ = POLICY.set(Policy { filters });
    Ok(())
}

/// Drops, on the calling (main) thread, the bounding-set capabilities no thread keeps; threads
/// started afterwards inherit that and each confine themselves with fewer syscalls.
pub fn narrow_bounding() -> Result<(), ConfineError> {
    caps::narrow_bounding().map_err(|source| ConfineError::Caps { kind: ThreadKind::Main.name(), source })
}

/// Confines the calling thread as `kind`: capabilities first (dropping them needs syscalls the
/// filter then forbids), then the seccomp filter.
pub fn confine_thread(kind: ThreadKind) -> Result<(), ConfineError> {
    KIND.with(|k| k.set(kind.index()));
    caps::restrict_thread(caps::needed(kind))
        .map_err(|source| ConfineError::Caps { kind: kind.name(), source })?;
    for prog in POLICY.get().and_then(|p| p.filters.get(&kind)).into_iter().flatten() {
        seccompiler::apply_filter(prog)
            .map_err(|source| ConfineError::Install { kind: kind.name(), source })?;
    }
    Ok(())
}

/// Whether filters are being installed.
pub fn seccomp_enabled() -> bool {
    POLICY.get().is_some()
}

/// Test hook: a syscall every filter forbids, to show that a violation kills the VMM and is
/// reported. Only reachable through `HUSK_VMM_SECCOMP_SELFTEST`.
pub fn forbidden_syscall() {
    // SAFETY: getppid has no preconditions and no effect.
    unsafe { libc::syscall(libc::SYS_getppid) };
}

fn install_sigsys_handler() -> Result<(), ConfineError> {
    // SAFETY: sigaction is plain old data; all-zero is a valid (empty) value.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    // SA_RESETHAND: after the report the default action (terminate) applies to the re-raise.
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
    // SAFETY: `sa` is initialised and the handler only makes async-signal-safe syscalls.
    let r = unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(ConfineError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Formats `n` in decimal into the end of `buf`, returning the digits.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The SIGSYS layout of siginfo_t (x86_64): si_call_addr at 16, si_syscall (int) at 24.
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; it is 128 bytes.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let kind = KIND.with(|k| k.get());
    let name = ThreadKind::ALL.get(usize::from(kind)).map_or("unconfined", |k| k.name());
    let mut digits = [0u8; 20];
    let parts: [&[u8]; 5] = [
        b"husk-vmm: seccomp: the ",
        name.as_bytes(),
        b" thread made syscall ",
        decimal(u64::from(nr.unsigned_abs()), &mut digits),
        b", which its filter forbids; stopping the VM\n",
    ];
    for p in parts {
        // SAFETY: write(2) on stderr with a valid buffer; async-signal-safe.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
    // The handler is now the default action (SA_RESETHAND). A second forbidden syscall makes
    // the kernel force SIGSYS again, and a forced signal with the default action terminates
    // even the init of a PID namespace (which husk-vmm is), where a raise() would be ignored.
    // SAFETY: getppid has no effect; exit_group is the fallback should it be let through.
    unsafe {
        libc::syscall(libc::SYS_getppid);
        libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_each_mode() {
        for mode in [SeccompMode::Enforce, SeccompMode::Log] {
            for kind in ThreadKind::ALL {
                for prog in filters::compile(kind, mode, 1234).expect("filter") {
                    assert!(!prog.is_empty() && prog.len() < 4096, "{kind:?}: {} instructions", prog.len());
                }
            }
        }
    }

    #[test]
    fn decimal_formats() {
        let mut b = [0u8; 20];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(39, &mut b), b"39");
        assert_eq!(decimal(u64::MAX, &mut b), b"18446744073709551615");
    }

    /// Runs only as the child of the test below (the SIGSYS must take a process of its own).
    #[test]
    fn sigsys_child() {
        let Some(what) = std::env::var_os("HUSK_SIGSYS_CHILD") else { return };
        enable(SeccompMode::Enforce).expect("enable");
        if what == "mmap-exec" {
            confine_thread(ThreadKind::VirtioFs).expect("confine");
            // SAFETY: an anonymous mapping request; the filter stops it before the kernel.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            unreachable!("the filter let an executable mapping through");
        }
        if what == "threads" {
            // The forwarder's filter lets it start named threads (clone3 -> ENOSYS -> clone).
            confine_thread(ThreadKind::LoopbackForward).expect("confine");
            let t = std::thread::Builder::new().name("child".into()).spawn(|| 7).expect("spawn");
            assert_eq!(t.join().expect("join"), 7);
            forbidden_syscall();
            unreachable!("the filter let getppid through");
        }
        confine_thread(ThreadKind::Vcpu).expect("confine");
        forbidden_syscall();
        unreachable!("the filter let getppid through");
    }

    fn run_child(what: &str) -> std::process::Output {
        let exe = std::env::current_exe().expect("test binary");
        std::process::Command::new(exe)
            .args(["--exact", "confine::tests::sigsys_child", "--test-threads=1", "--nocapture"])
            .env("HUSK_SIGSYS_CHILD", what)
            .output()
            .expect("run child")
    }

    #[test]
    fn a_forbidden_syscall_is_reported_and_kills_by_sigsys() {
        use std::os::unix::process::ExitStatusExt;
        for (what, kind, nr) in [
            ("getppid", "vcpu", libc::SYS_getppid),
            ("mmap-exec", "virtio-fs", libc::SYS_mmap),
            ("threads", "loopback-forward", libc::SYS_getppid),
        ] {
            let out = run_child(what);
            assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{what}: {out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            let want = format!("the {kind} thread made syscall {nr}");
            assert!(err.contains(&want), "{what}: {err}");
        }
    }
}
