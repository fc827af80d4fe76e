//! Caps on what the guest can make the passthrough hold. fuse-backend-rs 0.14's
//! `PassthroughFs` has none (its `Config` offers no limit, and it does not say how many inodes
//! or handles it holds): it keeps an `O_PATH` fd per inode the guest holds a lookup on and an fd
//! per open file or directory, so a guest could use up the VMM's file descriptors (and the
//! host kernel memory behind them) and starve everything else in the process, vsock included.
//! [`ShareFs`](super::ShareFs) counts both here and refuses past the caps with `ENFILE`.
//!
//! Per request, the passthrough allocates what the guest names before asking the host: a
//! GETXATTR or READDIR size up to 4 GiB. `ShareFs` cuts those to [`MAX_XATTR_SIZE`] and
//! [`MAX_READDIR_SIZE`] (what Linux can return, or asks for, anyway).
//!
//! Left unbounded (no hook in the passthrough): its inode-number map keeps one small entry
//! (no fd) per distinct host file the guest has ever looked up or listed, until FUSE_DESTROY or
//! a device reset. A read-only share bounds it by its size; a writable one by how many files the
//! host file system lets the guest create.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Most inodes the guest may hold lookups on at once (each pins an `O_PATH` fd); a lookup of
/// one more gets `ENFILE` until the guest forgets some.
pub const MAX_INODES: usize = 256 * 1024;
/// Most files and directories the guest may hold open at once (each an fd); one more open gets
/// `ENFILE`.
pub const MAX_OPEN_HANDLES: usize = 32 * 1024;
/// File descriptors the caps leave to the rest of the VMM (vsock streams, taps, KVM) when
/// `RLIMIT_NOFILE` is too low for both caps.
pub const FD_RESERVE: usize = 8 * 1024;
/// Largest extended attribute value Linux stores (XATTR_SIZE_MAX).
pub const MAX_XATTR_SIZE: u32 = 64 * 1024;
/// Most bytes of directory entries one READDIR or READDIRPLUS reads from the host. Linux asks
/// for a page at a time; a shorter reply only means another request.
pub const MAX_READDIR_SIZE: u32 = 1 << 20;
/// The least either cap is cut to under a low `RLIMIT_NOFILE`.
const MIN_CAP: usize = 256;

pub fn enfile() -> io::Error {
    io::Error::from_raw_os_error(libc::ENFILE)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub inodes: usize,
    pub handles: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { inodes: MAX_INODES, handles: MAX_OPEN_HANDLES }
    }
}

impl Limits {
    /// The caps, cut (in the same proportion) to what `nofile` descriptors allow once
    /// [`FD_RESERVE`] is set aside. Per share: a VM with several shares can hold that many
    /// per share.
    pub fn fitted_to(nofile: u64) -> Self {
        let full = Self::default();
        let budget = usize::try_from(nofile).unwrap_or(usize::MAX).saturating_sub(FD_RESERVE);
        let want = full.inodes + full.handles;
        if budget >= want {
            return full;
        }
        let share = |cap: usize| (cap as u128 * budget as u128 / want as u128) as usize;
        Self { inodes: share(full.inodes).max(MIN_CAP), handles: share(full.handles).max(MIN_CAP) }
    }

    /// [`Self::fitted_to`] this process's soft `RLIMIT_NOFILE`.
    pub fn fitted_to_process() -> Self {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit only writes `lim`.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return Self::default();
        }
        Self::fitted_to(lim.rlim_cur)
    }
}

/// Open handles. Exact: every handle comes from a successful open, opendir or create and goes
/// with a successful release or releasedir, or with FUSE_DESTROY.
#[derive(Debug)]
pub struct HandleCount {
    open: AtomicUsize,
    max: usize,
}

impl HandleCount {
    pub fn new(max: usize) -> Self {
        Self { open: AtomicUsize::new(0), max }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn count(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes a slot for an open about to happen; `ENFILE` when all are taken.
    pub fn reserve(&self) -> io::Result<()> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .map(drop)
            .map_err(|_| enfile())
    }

    /// Gives a slot back: its open failed, or the handle was released.
    pub fn release(&self) {
        let _ = self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    pub fn clear(&self) {
        self.open.store(0, Ordering::Release);
    }
}

/// Inodes with lookups outstanding, mirrored from the passthrough: every reply that hands the
/// guest an inode adds a reference, FORGET takes them away as `PassthroughFs::forget_one`
/// does (saturating; the inode goes at zero). The root is never counted (nor ever forgotten).
#[derive(Debug)]
pub struct InodeRefs {
    refs: Mutex<HashMap<u64, u64>>,
    max: usize,
}

impl InodeRefs {
    pub fn new(max: usize) -> Self {
        Self { refs: Mutex::new(HashMap::new()), max }
    }

    fn refs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        // Nothing panics while holding it; a poisoned map is still a consistent one.
        self.refs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn count(&self) -> usize {
        self.refs().len()
    }

    /// Whether a new inode would fit (checked before creating a file, which a refusal after
    /// the fact would not undo).
    pub fn has_room(&self) -> bool {
        self.refs().len() < self.max
    }

    /// Counts a lookup of `inode`; false (nothing counted) when it is a new inode and the
    /// table is full, and the caller must take the lookup back.
    pub fn try_add(&self, inode: u64) -> bool {
        let mut refs = self.refs();
        if let Some(n) = refs.get_mut(&inode) {
            *n = n.saturating_add(1);
            return true;
        }
        if refs.len() >= self.max {
            return false;
        }
        refs.insert(inode, 1);
        true
    }

    /// Counts a lookup of `inode` whatever the table holds (replies about a file just made).
    pub fn add(&self, inode: u64) {
        *self.refs().entry(inode).or_insert(0) += 1;
    }

    pub fn forget(&self, inode: u64, count: u64) {
        let mut refs = self.refs();
        if let Some(n) = refs.get_mut(&inode) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                refs.remove(&inode);
            }
        }
    }

    pub fn clear(&self) {
        self.refs().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_the_descriptor_limit() {
        assert_eq!(Limits::fitted_to(u64::MAX), Limits::default());
        assert_eq!(Limits::fitted_to((MAX_INODES + MAX_OPEN_HANDLES + FD_RESERVE) as u64), Limits::default());
        let l = Limits::fitted_to(20_000);
        assert!(l.inodes + l.handles <= 20_000 - FD_RESERVE, "{l:?}");
        assert!(l.inodes > l.handles);
        assert_eq!(Limits::fitted_to(1024), Limits { inodes: MIN_CAP, handles: MIN_CAP });
    }

    #[test]
    fn handle_slots() {
        let h = HandleCount::new(2);
        h.reserve().unwrap();
        h.reserve().unwrap();
        assert_eq!(h.reserve().unwrap_err().raw_os_error(), Some(libc::ENFILE));
        h.release();
        h.reserve().unwrap();
        h.clear();
        h.release(); // never below zero
        assert_eq!(h.count(), 0);
    }

    #[test]
    fn inode_refs_mirror_forget() {
        let r = InodeRefs::new(2);
        assert!(r.try_add(10) && r.try_add(10) && r.try_add(11));
        assert!(!r.try_add(12), "full");
        assert!(r.try_add(10), "known inodes still count");
        r.forget(10, 2);
        assert_eq!(r.count(), 2);
        r.forget(10, u64::MAX);
        r.forget(99, 1);
        assert_eq!(r.count(), 1);
        assert!(r.has_room() && r.try_add(12));
        r.add(13); // past the cap, for files already made
        assert_eq!(r.count(), 3);
        r.clear();
        assert_eq!(r.count(), 0);
    }
}
