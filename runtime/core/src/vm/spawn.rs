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
//!
//! The cgroup is joined by clone3's CLONE_INTO_CGROUP, not by writing `cgroup.procs`: such a
//! write takes the cgroup core's thread-group lock for writing, which waits for an RCU grace
//! period (about 10 ms in the test host, often more on a busy host with many CPUs), while a
//! clone into the cgroup only reads it. No libc wraps clone3 with a stack of the caller's, so
//! that call is made here ([`clone3_on_stack`]). Where clone3 or the flag is missing (Linux
//! before 5.7, or a seccomp profile that refuses clone3), the child writes `cgroup.procs`.

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
    spawn_with(s, true)
}

/// [`spawn`], where `into_cgroup` false takes the path of hosts without CLONE_INTO_CGROUP.
fn spawn_with(s: Spawn<'_>, into_cgroup: bool) -> io::Result<i32> {
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

    // The parent the child should see once it has asked to die with it. In a new PID namespace
    // getppid reads 0 (the parent is outside it), whether the parent lives or not.
    // SAFETY: getpid has no preconditions.
    let parent = if s.new_pid_ns { 0 } else { unsafe { libc::getpid() } };
    let raw = |f: &Option<OwnedFd>| f.as_ref().map_or(-1, |f| f.as_raw_fd());
    let mut ctx = ChildCtx {
        null_fd: devnull.as_raw_fd(),
        out_fd: stdout.as_raw_fd(),
        err_fd: stderr.as_raw_fd(),
        netns_fd: raw(&netns),
        procs_fd: -1,
        inherit: [raw(&fd3), raw(&fd4)],
        errpipe: err_w.as_raw_fd(),
        die_with_parent: s.die_with_parent,
        parent,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        // SAFETY: an all-zero sigset_t is a valid (empty) set; filled in below.
        mask: unsafe { std::mem::zeroed() },
    };
    let mut stack = vec![0u8; CHILD_STACK];
    let mut flags = libc::CLONE_VM | libc::CLONE_VFORK;
    if s.new_pid_ns {
        flags |= libc::CLONE_NEWPID;
    }
    let into = match &s.cgroup {
        Some(cg) if into_cgroup => Some(clone_child(flags, Some(cg.as_raw_fd()), &mut stack, &mut ctx)),
        _ => None,
    };
    // clone3 or its flag refused: Linux before 5.7, or a seccomp profile without clone3.
    let refused = |e: &io::Error| matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL | libc::E2BIG));
    let pid = match into {
        Some(r) if !matches!(&r, Err(e) if refused(e)) => r,
        // glibc's clone; the child joins the cgroup (if any) itself before exec.
        _ => {
            let procs = match &s.cgroup {
                Some(cg) => {
                    // SAFETY: openat on a live directory descriptor with a NUL-terminated name.
                    let fd = unsafe {
                        libc::openat(
                            cg.as_raw_fd(),
                            c"cgroup.procs".as_ptr(),
                            libc::O_WRONLY | libc::O_CLOEXEC,
                        )
                    };
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // SAFETY: a fresh descriptor nothing else owns.
                    Some(high(unsafe { OwnedFd::from_raw_fd(fd) })?)
                }
                None => None,
            };
            ctx.procs_fd = procs.as_ref().map_or(-1, |f| f.as_raw_fd());
            clone_child(flags, None, &mut stack, &mut ctx)
        }
    };
    drop(stack);
    let pid = pid?;
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
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)));
    }
    Ok(pid)
}

/// Stack of the child between clone and exec: a few syscalls deep.
const CHILD_STACK: usize = 64 * 1024;

/// clone3's flag to start the child in the cgroup whose directory `CloneArgs::cgroup` names.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` as of Linux 5.7 (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Starts [`child_entry`] with `ctx` on `stack` in a new process that shares our memory,
/// with all our signals blocked meanwhile; this thread waits (CLONE_VFORK) until the child
/// has exec'd or exited. With `cgroup`, the child starts in that cgroup (clone3, x86-64).
fn clone_child(
    flags: libc::c_int,
    cgroup: Option<RawFd>,
    stack: &mut [u8],
    ctx: &mut ChildCtx,
) -> io::Result<libc::pid_t> {
    let base = stack.as_mut_ptr();
    // The top, 16-byte aligned as the ABI wants it at a call; stacks grow down.
    let size = (base as usize + stack.len()) & !15usize;
    let size = size - base as usize;
    // No signal handler of ours may run in the child, which shares our memory: all signals
    // are blocked around the clone, and the child resets handlers before unblocking.
    // SAFETY: an all-zero sigset_t is valid, then filled; the masks live across the calls.
    // `child_entry` runs on `stack` in a process that shares this memory while this thread
    // waits for it to exec or exit; it reads `ctx`, which outlives the call, and makes only
    // syscalls.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut ctx.mask);
        let arg: *mut libc::c_void = (ctx as *mut ChildCtx).cast();
        let pid = match cgroup {
            #[cfg(target_arch = "x86_64")]
            Some(cg) => {
                let args = CloneArgs {
                    flags: flags as u64 | CLONE_INTO_CGROUP,
                    exit_signal: libc::SIGCHLD as u64,
                    stack: base as u64,
                    stack_size: size as u64,
                    cgroup: cg as u64,
                    ..CloneArgs::default()
                };
                let r = clone3_on_stack(&args, child_entry, arg);
                if r < 0 {
                    Err(io::Error::from_raw_os_error(-r as i32))
                } else {
                    Ok(r as libc::pid_t)
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Some(_) => Err(io::Error::from_raw_os_error(libc::ENOSYS)),
            None => {
                let pid = libc::clone(child_entry, base.add(size).cast(), flags | libc::SIGCHLD, arg);
                if pid < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(pid)
                }
            }
        };
        libc::pthread_sigmask(libc::SIG_SETMASK, &ctx.mask, std::ptr::null_mut());
        pid
    }
}

/// clone3 with the child running `entry(arg)` on the stack `args` names, then exiting with
/// its value (glibc's clone does this for clone; it has no public clone3 counterpart).
/// Returns the child's pid or a negative errno.
///
/// # Safety
/// `args.stack` .. `+ stack_size` must be memory the child may use as its stack, with a
/// 16-byte aligned top, and `args.flags` must include CLONE_VFORK when it has CLONE_VM: the
/// child must not run alongside this thread's use of that memory. `entry` must be sound to
/// run in such a child with `arg`.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_on_stack(
    args: &CloneArgs,
    entry: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> libc::c_long {
    let ret: libc::c_long;
    // SAFETY: the caller vouches for the stack and the entry. In the child the kernel has set
    // the stack pointer to the stack's top and kept every register but rax, rcx and r11, so
    // r12 and r13 still hold the entry and its argument; the child never returns here.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r13",
            "call r12",
            "mov edi, eax",
            "mov eax, {exit}",
            "syscall",
            "ud2",
            "2:",
            exit = const libc::SYS_exit,
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") entry,
            in("r13") arg,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    ret
}

/// What the child reads, prepared by the parent before the clone.
struct ChildCtx {
    null_fd: RawFd,
    out_fd: RawFd,
    err_fd: RawFd,
    netns_fd: RawFd,
    /// The cgroup's `cgroup.procs`, opened for writing, when clone could not start the child
    /// in the cgroup; -1 otherwise.
    procs_fd: RawFd,
    inherit: [RawFd; 2],
    errpipe: RawFd,
    die_with_parent: bool,
    /// What getppid must read in the child while the parent lives.
    parent: libc::pid_t,
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
        if c.die_with_parent {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The parent may have gone before the request took effect (not seen from a new
            // PID namespace, where the parent always reads as 0).
            if libc::getppid() != c.parent {
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

    /// A cgroup v2 mount of this host, from our mountinfo.
    fn cgroup2_mount() -> Option<std::path::PathBuf> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        info.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split(' ').next() == Some("cgroup2")).then(|| pre.split(' ').nth(4).map(Into::into))?
        })
    }

    #[test]
    fn starts_in_the_cgroup_it_is_given() {
        starts_in_cgroup(true);
    }

    #[test]
    fn starts_in_the_cgroup_it_is_given_without_clone3() {
        starts_in_cgroup(false);
    }

    fn starts_in_cgroup(into_cgroup: bool) {
        let Some(mount) = cgroup2_mount() else {
            eprintln!("skipped: no cgroup v2 mount on this host");
            return;
        };
        let dir = mount.join(format!("husk-spawn-test-{}-{into_cgroup}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&dir) {
            eprintln!("skipped: cannot make a cgroup under {}: {e}", mount.display());
            return;
        }
        let ours = std::fs::read_to_string("/proc/self/cgroup").expect("our cgroup");
        let (r, w) = pipe_fds();
        let mut s = plain("/bin/cat", &["/proc/self/cgroup"], w, None, false);
        s.cgroup = Some(std::fs::File::open(&dir).expect("open cgroup").into());
        let pid = spawn_with(s, into_cgroup);
        let out = pid.as_ref().ok().map(|&pid| {
            let mut status = 0;
            // SAFETY: reaping our child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            std::io::read_to_string(std::fs::File::from(r)).expect("read")
        });
        let removed = std::fs::remove_dir(&dir);
        let out = out.expect("spawn");
        let name = dir.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(out.lines().any(|l| l.starts_with("0::/") && l.ends_with(name)), "{out}");
        // Only the child moved.
        assert_eq!(std::fs::read_to_string("/proc/self/cgroup").expect("our cgroup"), ours);
        removed.expect("the cgroup empties when the child is gone");
    }

    #[test]
    fn a_helper_in_a_pid_namespace_of_its_own_runs() {
        // getppid reads 0 there: the check that the parent still lives must not take that
        // for a dead parent.
        let (r, w) = pipe_fds();
        let mut s = plain("/bin/sh", &["-c", "echo $$"], w, None, true);
        s.new_pid_ns = true;
        let pid = match spawn(s) {
            Ok(pid) => pid,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("skipped: no CAP_SYS_ADMIN for a PID namespace: {e}");
                return;
            }
            Err(e) => panic!("spawn: {e}"),
        };
        let mut status = 0;
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let out = std::io::read_to_string(std::fs::File::from(r)).expect("read");
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status:#x}");
        assert_eq!(out, "1\n", "the helper is its namespace's init");
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
