//! Closing a descriptor whose last close is slow, without waiting for it.
//!
//! A KVM VM is destroyed when its last descriptor closes, and on the hosts we know that close
//! mostly waits (RCU grace periods, the VM's kernel threads stopping): about 40 ms in the test
//! host. husk-vmm hands a duplicate of its VM descriptor to the runtime (see
//! `husk_vmm::handover`), so the VMM's exit skips that wait; this module then closes the
//! duplicate in a short-lived process of its own that nobody waits for.
//!
//! The process is a grandchild made with `CLONE_VM`: sharing this process's memory costs no
//! page-table copy (a fork of a runtime would), and the intermediate child exits at once, so
//! the grandchild belongs to init (or the nearest subreaper), which reaps it. It has its own
//! descriptor table: it closes every descriptor but the one it was made for (a pipe it kept
//! open would hold up a reader waiting for our output to end), closes that one and exits.

use std::io;
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Stack of each cloned process: they only make a few raw syscalls.
const STACK_LEN: usize = 64 * 1024;

/// One closer's memory: what it reads, then the intermediate's and the closer's stacks.
#[repr(C)]
struct Closer {
    fd: RawFd,
    /// Set by the closer once it no longer touches this memory but for its exit.
    done: AtomicBool,
    /// A directory to remove once the descriptor is closed (NUL-terminated; empty for none).
    rmdir: [u8; PATH_MAX],
}

/// Longest directory path a closer removes (with its NUL).
const PATH_MAX: usize = 1024;
/// How long a closer keeps trying to remove its directory (the VM's kernel threads leave its
/// cgroup moments after the VM is destroyed): tries, and the pause between them.
const RMDIR_TRIES: u32 = 200;
const RMDIR_PAUSE_NS: libc::c_long = 5_000_000;

/// The Closer's page(s), then two stacks.
const HEADER_LEN: usize = 4096 * 2;
const REGION_LEN: usize = HEADER_LEN + 2 * STACK_LEN;

/// Regions of closers that may still run (addresses, as usize to be Send).
static LIVE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Closes `fd` in a detached process and then removes directory `then_rmdir` (a cgroup that
/// empties once the VM is destroyed), trying for about a second. Returns whether the process
/// was made; if not, `fd` is closed here and the directory is the caller's to remove.
pub fn close_detached(fd: OwnedFd, then_rmdir: Option<&Path>) -> bool {
    reclaim();
    let raw = fd.into_raw_fd();
    let made = match spawn_closer(raw, then_rmdir) {
        Ok(region) => {
            if let Ok(mut live) = LIVE.lock() {
                live.push(region as usize);
            }
            true
        }
        Err(e) => {
            tracing::debug!("closing a VM descriptor in place: {e}");
            false
        }
    };
    // SAFETY: `raw` came from an OwnedFd and was given up above; the closer, if made, has its
    // own copy of the descriptor table, so this one is ours alone.
    unsafe { libc::close(raw) };
    made
}

/// Unmaps the regions of closers that are done.
fn reclaim() {
    let Ok(mut live) = LIVE.lock() else { return };
    live.retain(|&addr| {
        // SAFETY: a region in LIVE is mapped until removed from it, here.
        let done = unsafe { &*(addr as *const Closer) }.done.load(Ordering::Acquire);
        if done {
            // SAFETY: the closer sets `done` only when nothing of it uses the region any more.
            unsafe { libc::munmap(addr as *mut libc::c_void, REGION_LEN) };
        }
        !done
    });
}

/// Starts the closer; returns its region, which stays mapped until it is done.
fn spawn_closer(fd: RawFd, then_rmdir: Option<&Path>) -> io::Result<*mut u8> {
    let mut rmdir = [0u8; PATH_MAX];
    if let Some(p) = then_rmdir {
        let b = p.as_os_str().as_bytes();
        if b.len() >= PATH_MAX || b.contains(&0) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "directory path too long"));
        }
        rmdir[..b.len()].copy_from_slice(b);
    }
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let region = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            REGION_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if region == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let region = region.cast::<u8>();
    // SAFETY: the region is large enough and page aligned for a Closer at its start.
    unsafe { region.cast::<Closer>().write(Closer { fd, done: AtomicBool::new(false), rmdir }) };
    // SAFETY: clone runs `intermediate` at the top of the region's first stack, in a process
    // that shares our memory (CLONE_VM) while this thread waits (CLONE_VFORK) until it exits.
    // It makes only raw syscalls on the region.
    let pid = unsafe {
        libc::clone(
            intermediate,
            region.add(HEADER_LEN + STACK_LEN).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            region.cast(),
        )
    };
    let made = if pid < 0 {
        Err(io::Error::last_os_error())
    } else {
        let mut status = 0;
        // SAFETY: reaping the intermediate child, which has exited (CLONE_VFORK returned).
        unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            Ok(region)
        } else {
            Err(io::Error::other(format!("the closer could not be made (status {status:#x})")))
        }
    };
    if made.is_err() {
        // SAFETY: no closer runs on the region (the intermediate has exited without one).
        unsafe { libc::munmap(region.cast(), REGION_LEN) };
    }
    made
}

/// The intermediate child: starts the closer and exits, so the closer is reparented at once.
extern "C" fn intermediate(region: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the closer gets the region's second stack (its top is the region's end); CLONE_VM
    // without CLONE_FILES gives it its own copy of the descriptor table.
    let pid = unsafe {
        libc::clone(
            closer,
            region.cast::<u8>().add(REGION_LEN).cast(),
            libc::CLONE_VM | libc::SIGCHLD,
            region,
        )
    };
    // SAFETY: _exit ends this process only, running nothing of the parent's.
    unsafe { libc::_exit(if pid < 0 { 1 } else { 0 }) }
}

/// A raw syscall returning the kernel's result (negative errno on failure): the closer shares
/// our memory, so it must not write `errno`, which lives in a thread of ours.
///
/// # Safety
/// As the syscall `n` with these arguments.
unsafe fn raw_syscall(n: libc::c_long, a1: usize, a2: usize, a3: usize) -> isize {
    let ret: isize;
    // SAFETY: the caller vouches for the syscall; `syscall` clobbers rcx and r11 only.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

/// The closer: closes everything but the descriptor, then the descriptor, removes the
/// directory if it has one, then exits.
extern "C" fn closer(region: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the region starts with the Closer written before any clone.
    let c = unsafe { &*region.cast::<Closer>() };
    let fd = c.fd as usize;
    // SAFETY: raw syscalls on this process's own descriptor table, and on the path and
    // timespec in its own memory.
    unsafe {
        if fd > 0 {
            raw_syscall(libc::SYS_close_range, 0, fd - 1, 0);
        }
        raw_syscall(libc::SYS_close_range, fd + 1, libc::c_uint::MAX as usize, 0);
        raw_syscall(libc::SYS_close, fd, 0, 0);
        if c.rmdir[0] != 0 {
            let pause = libc::timespec { tv_sec: 0, tv_nsec: RMDIR_PAUSE_NS };
            for _ in 0..RMDIR_TRIES {
                // Removed, gone or refused: done. Busy: the VM's kernel threads are leaving.
                if raw_syscall(libc::SYS_rmdir, c.rmdir.as_ptr() as usize, 0, 0) != -(libc::EBUSY as isize) {
                    break;
                }
                raw_syscall(libc::SYS_nanosleep, &pause as *const libc::timespec as usize, 0, 0);
            }
        }
    }
    c.done.store(true, Ordering::Release);
    // From here the region may be unmapped under us: exit without touching the stack.
    // SAFETY: exit(2) ends this process; the instruction sequence uses registers only.
    unsafe {
        std::arch::asm!("syscall", in("rax") libc::SYS_exit, in("rdi") 0, options(noreturn, nostack));
    }
}

const _: () = assert!(std::mem::size_of::<Closer>() <= HEADER_LEN);

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsRawFd;

    use super::*;

    fn pipe() -> (std::fs::File, OwnedFd) {
        let (r, w) = std::io::pipe().expect("pipe");
        (std::fs::File::from(OwnedFd::from(r)), OwnedFd::from(w))
    }

    #[test]
    fn the_descriptor_is_closed_and_nothing_else_is_held() {
        // `other` stands for our stdout: the closer must not keep it open.
        let (mut other_r, other_w) = pipe();
        let (mut r, w) = pipe();
        assert!(close_detached(w, None));
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).expect("end of file once the closer closed the write end");
        assert!(buf.is_empty());
        drop(other_w);
        other_r.read_to_end(&mut buf).expect("end of file: the closer held no copy");
        // Our own descriptors are untouched.
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        assert!(unsafe { libc::fcntl(r.as_raw_fd(), libc::F_GETFD) } >= 0);
    }

    #[test]
    fn the_directory_goes_after_the_descriptor() {
        let dir = std::env::temp_dir().join(format!("husk-release-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("inner")).expect("mkdir");
        let (mut r, w) = pipe();
        assert!(close_detached(w, Some(&dir.join("inner"))));
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).expect("closed");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while dir.join("inner").exists() {
            assert!(std::time::Instant::now() < deadline, "directory left");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::fs::remove_dir(&dir).expect("rmdir");
        let too_long = Path::new("/").join("x".repeat(PATH_MAX));
        let (_r, w) = pipe();
        assert!(!close_detached(w, Some(&too_long)), "a path it cannot hold is the caller's");
    }

    #[test]
    fn closers_are_not_our_children_and_their_memory_is_reclaimed() {
        for _ in 0..8 {
            let (mut r, w) = pipe();
            assert!(close_detached(w, None));
            let mut buf = Vec::new();
            r.read_to_end(&mut buf).expect("closed");
        }
        // The intermediates were reaped and the closers belong to someone else: this thread
        // has no child left.
        let children = std::fs::read_to_string("/proc/thread-self/children").unwrap_or_default();
        assert_eq!(children.trim(), "", "children of this thread: {children}");
        // Every closer above has closed its descriptor; once they are done, a sweep unmaps
        // their memory.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            reclaim();
            if LIVE.lock().expect("lock").is_empty() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "closers never finished");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
