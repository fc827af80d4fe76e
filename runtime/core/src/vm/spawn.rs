//! Starting husk-vmm in namespaces of its own. std's `Command` cannot ask for a PID namespace
//! (the new process must be made by clone with CLONE_NEWPID to be its init), so the VMM is
//! started with clone: in a new PID namespace, in its sandbox's cgroup before its first
//! instruction, in the pod's network namespace, in a session of its own, with only the
//! descriptors listed here.
//!
//! The child shares this process's memory until it execs (CLONE_VM | CLONE_VFORK, as
//! posix_spawn does): a fork would copy the page tables of a runtime with a tokio runtime and
//! its heaps, and every page this process wrote afterwards would fault once more (a few
//! hundred faults a VM start, in the test host each costing tens of microseconds).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What the new process gets.
#[derive(Debug)]
pub struct Spawn<'a> {
    pub program: &'a Path,
    pub args: Vec<&'a OsStr>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// A network namespace to join.
    pub netns: Option<OwnedFd>,
    /// A descriptor the process inherits as fd 3.
    pub fd3: Option<OwnedFd>,
    /// A descriptor the process inherits as fd 4.
    pub fd4: Option<OwnedFd>,
    /// A cgroup v2 directory to start in.
    pub cgroup: Option<OwnedFd>,
    pub new_pid_ns: bool,
    /// Killed when the spawning thread ends (a helper VM that is only useful to its maker);
    /// sandbox VMMs outlive the CLI call that starts them and leave this off.
    pub die_with_parent: bool,
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in an argument"))
}

/// A descriptor at 10 or above, so the moves to 0-3 in the child never overwrite a source.
fn high(fd: OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a live descriptor; the result is a fresh descriptor we own.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `n` was just returned by fcntl and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Starts the process and returns its pid (in our PID namespace) once it has exec'd.
pub fn spawn(s: Spawn<'_>) -> io::Result<i32> {
    // Everything the child touches is prepared here: after clone it may only make syscalls.
    let program = cstring(s.program.as_os_str().as_bytes())?;
    let mut argv_c = vec![program.clone()];
    for a in &s.args {
        argv_c.push(cstring(a.as_bytes())?);
    }
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let env_c: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());

    let devnull = high(OwnedFd::from(std::fs::File::open("/dev/null")?))?;
    let stdout = high(s.stdout)?;
    let stderr = high(s.stderr)?;
    let netns = s.netns.map(high).transpose()?;
    let fd3 = s.fd3.map(high).transpose()?;
    let fd4 = s.fd4.map(high).transpose()?;
    let mut pipe = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `pipe`.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (err_r, err_w) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let err_w = high(err_w)?;

    // The child joins the cgroup itself, before exec: clone3's CLONE_INTO_CGROUP would need a
    // raw clone3 with a stack of its own, which no libc wrapper offers.
    let procs = match &s.cgroup {
        Some(cg) => {
            // SAFETY: openat on a live directory descriptor with a NUL-terminated name.
            let fd = unsafe {
                libc::openat(cg.as_raw_fd(), c"cgroup.procs".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC)
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor nothing else owns.
            Some(high(unsafe { OwnedFd::from_raw_fd(fd) })?)
        }
        None => None,
    };
    // SAFETY: getpid has no preconditions.
    let parent = if s.die_with_parent { unsafe { libc::getpid() } } else { 0 };
    let raw = |f: &Option<OwnedFd>| f.as_ref().map_or(-1, |f| f.as_raw_fd());
    let mut ctx = ChildCtx {
        null_fd: devnull.as_raw_fd(),
        out_fd: stdout.as_raw_fd(),
        err_fd: stderr.as_raw_fd(),
        netns_fd: raw(&netns),
        procs_fd: raw(&procs),
        inherit: [raw(&fd3), raw(&fd4)],
        errpipe: err_w.as_raw_fd(),
        die_with: parent,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        // SAFETY: an all-zero sigset_t is a valid (empty) set; filled in below.
        mask: unsafe { std::mem::zeroed() },
    };
    let mut stack = vec![0u8; CHILD_STACK];
    let mut flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    if s.new_pid_ns {
        flags |= libc::CLONE_NEWPID;
    }
    // No signal handler of ours may run in the child, which shares our memory: all signals
    // are blocked around the clone, and the child resets handlers before unblocking.
    // SAFETY: an all-zero sigset_t is valid, then filled; the masks live across the calls.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut ctx.mask);
        // SAFETY: `child_entry` runs on `stack` (its top: stacks grow down) in a process that
        // shares this memory while this thread waits (CLONE_VFORK) for it to exec or exit;
        // it reads `ctx`, which outlives the call, and makes only syscalls.
        let top = stack.as_mut_ptr().add(CHILD_STACK & !15);
        let pid = libc::clone(child_entry, top.cast(), flags, (&mut ctx as *mut ChildCtx).cast());
        libc::pthread_sigmask(libc::SIG_SETMASK, &ctx.mask, std::ptr::null_mut());
        pid
    };
    drop(stack);
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(err_w);
    // The write end closes at exec; anything read first is the child's errno.
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        // SAFETY: reading into the rest of `buf`.
        let n = unsafe { libc::read(err_r.as_raw_fd(), buf[got..].as_mut_ptr().cast(), 4 - got) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    if got == 4 {
        let mut status = 0;
        // SAFETY: reaping the child that failed to exec.
        unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)));
    }
    Ok(pid as i32)
}

/// Stack of the child between clone and exec: a few syscalls deep.
const CHILD_STACK: usize = 64 * 1024;

/// What the child reads, prepared by the parent before the clone.
struct ChildCtx {
    null_fd: RawFd,
    out_fd: RawFd,
    err_fd: RawFd,
    netns_fd: RawFd,
    /// The cgroup's `cgroup.procs`, opened for writing.
    procs_fd: RawFd,
    inherit: [RawFd; 2],
    errpipe: RawFd,
    die_with: libc::pid_t,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// The parent thread's signal mask, restored in the child before exec.
    mask: libc::sigset_t,
}

extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's ChildCtx, alive while the parent waits for this child.
    unsafe { child(&*arg.cast::<ChildCtx>()) }
}

/// The child between clone and execve. It shares the parent's memory (CLONE_VM), so it only
/// makes syscalls (errno aside: it is the waiting parent thread's) on what `c` points to.
///
/// # Safety
/// Must only run in the freshly cloned child; `c.argv` and `c.envp` are NULL-terminated arrays
/// of valid C strings.
unsafe fn child(c: &ChildCtx) -> ! {
    let fail = |errno: i32| -> ! {
        let b = errno.to_ne_bytes();
        // SAFETY: writing 4 bytes from a live buffer, then leaving without running any
        // destructor or atexit handler of the parent's.
        unsafe {
            libc::write(c.errpipe, b.as_ptr().cast(), 4);
            libc::_exit(127)
        }
    };
    let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
    // SAFETY: plain syscalls on descriptors this child owns a copy of, on its own signal
    // dispositions, and on the argument arrays the caller vouches for.
    unsafe {
        // The parent's handlers must not run here: back to the defaults (ignored signals stay
        // ignored, as across exec), then the parent's mask.
        for sig in 1..libc::SIGRTMAX() {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction != libc::SIG_DFL
                && old.sa_sigaction != libc::SIG_IGN
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &c.mask, std::ptr::null_mut());
        // Into the sandbox's cgroup before the program's first instruction ("0": this process).
        if c.procs_fd >= 0 && libc::write(c.procs_fd, b"0".as_ptr().cast(), 1) != 1 {
            fail(errno());
        }
        // Its own session: a caller's Ctrl-C or hang-up must not take the sandbox down.
        libc::setsid();
        if c.die_with != 0 {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The parent may have gone before the request took effect.
            if libc::getppid() != c.die_with {
                libc::_exit(127);
            }
        }
        if c.netns_fd >= 0 && libc::setns(c.netns_fd, libc::CLONE_NEWNET) != 0 {
            fail(errno());
        }
        for (from, to) in [(c.null_fd, 0), (c.out_fd, 1), (c.err_fd, 2)] {
            if libc::dup2(from, to) != to {
                fail(errno());
            }
        }
        // fd 3 and 4 as given; a slot without one is closed at exec with everything else.
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        for (from, to) in c.inherit.into_iter().zip(3..) {
            if from >= 0 {
                if libc::dup2(from, to) != to {
                    fail(errno());
                }
            } else {
                libc::syscall(libc::SYS_close_range, to, to, CLOSE_RANGE_CLOEXEC);
            }
        }
        // Nothing else is inherited.
        libc::syscall(libc::SYS_close_range, 5, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC);
        // The error pipe must survive until exec (close_range marked it close-on-exec).
        libc::execve(*c.argv, c.argv, c.envp);
        fail(errno())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe_fds() -> (OwnedFd, OwnedFd) {
        let mut p = [0; 2];
        // SAFETY: pipe2 fills `p` with two fresh descriptors.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors owned here only.
        unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
    }

    /// A spawn with both output streams on `w`, in no other namespace or cgroup.
    fn plain<'a>(
        program: &'a str,
        args: &'a [&'a str],
        w: OwnedFd,
        fd3: Option<OwnedFd>,
        die: bool,
    ) -> Spawn<'a> {
        Spawn {
            program: Path::new(program),
            args: args.iter().map(OsStr::new).collect(),
            stdout: w.try_clone().expect("dup"),
            stderr: w,
            netns: None,
            fd3,
            fd4: None,
            cgroup: None,
            new_pid_ns: false,
            die_with_parent: die,
        }
    }

    #[test]
    fn spawns_with_fd3_and_reports_exec_errors() {
        let (r, w) = pipe_fds();
        let dir = std::fs::File::open("/").expect("open /");
        let script = "ls /proc/self/fd; readlink /proc/self/fd/3";
        let pid = spawn(plain("/bin/sh", &["-c", script], w, Some(dir.into()), false)).expect("spawn");
        let mut status = 0;
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let out = std::io::read_to_string(std::fs::File::from(r)).expect("read");
        let fds: Vec<&str> = out.lines().collect();
        // 0-3 and the fd ls itself opened; nothing else leaked in.
        assert_eq!(fds[..4], ["0", "1", "2", "3"], "{out}");
        assert!(out.ends_with("/\n"), "{out}");

        let (_r, w) = pipe_fds();
        let e = spawn(plain("/nonexistent/husk-vmm", &[], w, None, false)).expect_err("no such program");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn fd4_comes_without_fd3() {
        let (r, w) = pipe_fds();
        let mut s = plain("/bin/sh", &["-c", "ls /proc/self/fd; readlink /proc/self/fd/4"], w, None, false);
        s.fd4 = Some(std::fs::File::open("/").expect("open /").into());
        let pid = spawn(s).expect("spawn");
        let mut status = 0;
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let out = std::io::read_to_string(std::fs::File::from(r)).expect("read");
        let fds: Vec<&str> = out.lines().collect();
        // 0-2, 4, and the one ls opened (3, the lowest free); nothing else leaked in.
        assert_eq!(fds[..5], ["0", "1", "2", "3", "4"], "{out}");
        assert_eq!(fds.len(), 6, "{out}");
        assert!(out.ends_with("/\n"), "{out}");
    }

    #[test]
    fn the_child_gets_our_signal_mask_not_the_clone_time_one() {
        let (r, w) = pipe_fds();
        let pid =
            spawn(plain("/bin/sh", &["-c", "grep -E '^Sig(Blk|Cgt)' /proc/self/status"], w, None, false))
                .expect("spawn");
        let mut status = 0;
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let out = std::io::read_to_string(std::fs::File::from(r)).expect("read");
        // The test thread blocks nothing; everything was blocked only around the clone.
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
    }

    #[test]
    fn a_helper_dies_with_the_thread_that_started_it() {
        // The parent-death signal follows the spawning thread: one that ends takes it along.
        let pid = std::thread::spawn(|| {
            let (_r, w) = pipe_fds();
            spawn(plain("/bin/sleep", &["100"], w, None, true)).expect("spawn")
        })
        .join()
        .expect("thread");
        let mut status = 0;
        // SAFETY: reaping our child (it is this process's, whichever thread started it).
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL, "status {status:#x}");
    }
}
