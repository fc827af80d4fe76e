//! A [`FileSystem`] wrapper around `PassthroughFs` that adds what husk's shares need on top of
//! it: read-only shares (every mutating request gets `EROFS`, like a read-only mount), no device
//! nodes on the host, no `umask(0)` left behind by the passthrough's root import on a thread
//! that shares the process's umask, and caps on the inodes and open handles the guest can make
//! it hold ([`super::limits`]); under `cache=auto`, the guest's cache of a file kept across
//! opens while the file is unchanged ([`super::keep_cache`]).
//!
//! Every method that `PassthroughFs` implements is forwarded explicitly: a method left out here
//! would silently fall back to the trait's default (usually `ENOSYS`), not to the inner file
//! system.

use std::ffi::CStr;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn, ROOT_ID};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::keep_cache::{FileVersion, OpenVersions};
use super::limits::{enfile, HandleCount, InodeRefs, Limits, MAX_READDIR_SIZE, MAX_XATTR_SIZE};
use crate::devices::virtio::log_limit::LogLimit;

type Inode = u64;
type Handle = u64;

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// Open flags that need a writable file system (`open(2)` on a read-only mount fails with
/// `EROFS` for all of them).
const WRITE_OPEN_FLAGS: i32 = libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND;

/// Refuses `O_PATH` in OPEN, OPENDIR and CREATE. The Linux FUSE client never sends it (such
/// opens do not reach the file system), and the passthrough would turn it into a handle on an
/// `O_PATH` fd, whose `fcntl(F_SETFL)` in READ/WRITE then fails on a path where fuse-backend-rs
/// 0.14 drops a `File` made from the handle's fd: the fd is closed under the handle, its number
/// can be reused by another open, and it is closed again when the handle goes (found by the
/// `virtio_fs_request` fuzz target).
fn check_open_flags(flags: u32) -> io::Result<()> {
    if (flags as i32) & libc::O_PATH != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

pub struct ShareFs {
    inner: PassthroughFs,
    read_only: bool,
    inodes: InodeRefs,
    handles: HandleCount,
    /// For the warnings at the caps, which a guest can hit in a loop.
    warn: Mutex<(LogLimit, LogLimit)>,
    /// Set under `cache=auto`: opens of unchanged files keep the guest's page cache.
    versions: Option<OpenVersions>,
    /// How long the guest may trust that a name does not exist; zero: not at all.
    negative_timeout: Duration,
    /// Whether the guest may keep symlink targets in its page cache (FUSE_CACHE_SYMLINKS).
    cache_symlinks: bool,
}

impl std::fmt::Debug for ShareFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareFs")
            .field("read_only", &self.read_only)
            .field("inodes", &self.inodes.count())
            .field("handles", &self.handles.count())
            .finish_non_exhaustive()
    }
}

impl ShareFs {
    pub fn new(inner: PassthroughFs, read_only: bool) -> Self {
        Self::with_limits(inner, read_only, Limits::default())
    }

    pub fn with_limits(inner: PassthroughFs, read_only: bool, limits: Limits) -> Self {
        Self {
            inner,
            read_only,
            inodes: InodeRefs::new(limits.inodes),
            handles: HandleCount::new(limits.handles),
            warn: Mutex::new((LogLimit::new(), LogLimit::new())),
            versions: None,
            negative_timeout: Duration::ZERO,
            cache_symlinks: false,
        }
    }

    /// For shares whose names the guest may trust for `timeout`: a name that does not exist is
    /// answered as a negative entry valid that long (the kernel then keeps it, as it keeps
    /// found names, instead of asking again at each path walk through it), and symlink
    /// targets are cached. A symlink's target never changes in place: a new one is a new
    /// inode.
    pub fn caching_names(mut self, timeout: Duration) -> Self {
        self.negative_timeout = timeout;
        self.cache_symlinks = true;
        self
    }

    /// Opens of a file unchanged since its previous open keep the guest's cached pages.
    pub fn keeping_unchanged_files_cached(mut self) -> Self {
        self.versions = Some(OpenVersions::default());
        self
    }

    /// The inodes and open handles the guest holds now.
    #[cfg(test)]
    pub(super) fn held(&self) -> (usize, usize) {
        (self.inodes.count(), self.handles.count())
    }

    /// What this wrapper keeps about an inode the guest forgot `count` lookups of.
    fn forgotten(&self, inode: Inode, count: u64) {
        self.inodes.forget(inode, count);
        if let Some(v) = &self.versions {
            v.forget(inode);
        }
    }

    fn warn_inode_cap(&self) {
        let mut w = self.warn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held_back) = w.0.check() {
            tracing::warn!(
                held_back,
                "virtio-fs: the guest holds {} inodes, the cap; lookups get ENFILE",
                self.inodes.max()
            );
        }
    }

    fn warn_handle_cap(&self) {
        let mut w = self.warn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held_back) = w.1.check() {
            tracing::warn!(
                held_back,
                "virtio-fs: the guest holds {} open files, the cap; opens get ENFILE",
                self.handles.max()
            );
        }
    }

    /// Counts the inode a lookup handed out, or takes the lookup back at the cap.
    fn admit(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        if entry.inode == ROOT_ID || self.inodes.try_add(entry.inode) {
            return Ok(entry);
        }
        self.inner.forget(ctx, entry.inode, 1);
        self.warn_inode_cap();
        Err(enfile())
    }

    /// Refuses a request that would make a new inode when the table is full: the file would be
    /// made before the reply could be refused.
    fn check_inode_room(&self) -> io::Result<()> {
        if self.inodes.has_room() {
            return Ok(());
        }
        self.warn_inode_cap();
        Err(enfile())
    }

    /// Counts the inode a request that made a file handed out.
    fn made(&self, entry: Entry) -> Entry {
        if entry.inode != ROOT_ID {
            self.inodes.add(entry.inode);
        }
        entry
    }

    /// Runs an open with a handle slot reserved, kept only if a handle came back.
    fn with_handle<T>(
        &self,
        open: impl FnOnce() -> io::Result<T>,
        handle: impl Fn(&T) -> Option<Handle>,
    ) -> io::Result<T> {
        if let Err(e) = self.handles.reserve() {
            self.warn_handle_cap();
            return Err(e);
        }
        let r = open();
        if !matches!(&r, Ok(v) if handle(v).is_some()) {
            self.handles.release();
        }
        r
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(erofs())
        } else {
            Ok(())
        }
    }

    /// `PassthroughFs::import` (run by `init` and `destroy`) sets the calling thread's umask to
    /// 0 so that guest-chosen modes land unmasked. On the server thread that umask is its own
    /// ([`super::prepare_server_thread`]) and this puts the 0 back. On any other thread (a
    /// reset, tests, fuzz targets) it is the process's, and would make every file the VMM
    /// creates later (sockets, logs) world-writable: this puts the process's umask back, though
    /// the process still runs with 0 for the moment in between.
    fn with_umask_restored<T>(f: impl FnOnce() -> T) -> T {
        // SAFETY: umask(2) takes no pointers and cannot fail; it swaps this thread's mask (the
        // process's, unless unshared), which can only be read by setting it; `f` sets it again.
        let old = unsafe { libc::umask(0o077) };
        let out = f();
        // SAFETY: umask(2) takes no pointers and cannot fail; this puts back the mask saved above.
        unsafe { libc::umask(old) };
        out
    }
}

impl FileSystem for ShareFs {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let want = Self::with_umask_restored(|| self.inner.init(capable))?;
        // Requests of up to 1 MiB (fuse-backend-rs's 256 pages) instead of the kernel's
        // default 128 KiB: each request is a round trip through the queue, an exit and an
        // interrupt, and reading a program in 128 KiB pieces was a third of a container
        // start's requests. The agent raises the share's readahead to match.
        let mut want = want | FsOptions::MAX_PAGES;
        if self.cache_symlinks && capable.contains(FsOptions::CACHE_SYMLINKS) {
            want |= FsOptions::CACHE_SYMLINKS;
        }
        Ok(want)
    }

    fn destroy(&self) {
        Self::with_umask_restored(|| self.inner.destroy());
        // The passthrough dropped every inode and handle.
        self.inodes.clear();
        self.handles.clear();
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        match self.inner.lookup(ctx, parent, name) {
            Ok(entry) => self.admit(ctx, entry),
            // Node id 0 is the protocol's negative entry; it holds no inode, so nothing is
            // counted and the kernel never forgets it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !self.negative_timeout.is_zero() => {
                Ok(Entry {
                    inode: 0,
                    generation: 0,
                    // SAFETY: stat64 is plain integers, for which all zeros is a valid value.
                    attr: unsafe { std::mem::zeroed() },
                    attr_flags: 0,
                    attr_timeout: Duration::ZERO,
                    entry_timeout: self.negative_timeout,
                })
            }
            Err(e) => Err(e),
        }
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        self.forgotten(inode, count);
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        for &(inode, count) in &requests {
            self.forgotten(inode, count);
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(&self, ctx: &Context, inode: Inode, handle: Option<Handle>) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.check_writable()?;
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(&self, ctx: &Context, linkname: &CStr, parent: Inode, name: &CStr) -> io::Result<Entry> {
        self.check_writable()?;
        self.check_inode_room()?;
        self.inner.symlink(ctx, linkname, parent, name).map(|e| self.made(e))
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        // A device node made by a guest running as root would be a host device node, usable by
        // anything on the host that can reach the share. FIFOs and sockets are harmless.
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.check_inode_room()?;
        self.inner.mknod(ctx, inode, name, mode, rdev, umask).map(|e| self.made(e))
    }

    fn mkdir(&self, ctx: &Context, parent: Inode, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry> {
        self.check_writable()?;
        self.check_inode_room()?;
        self.inner.mkdir(ctx, parent, name, mode, umask).map(|e| self.made(e))
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.inner.rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: Inode, newparent: Inode, newname: &CStr) -> io::Result<Entry> {
        self.check_writable()?;
        self.check_inode_room()?;
        self.inner.link(ctx, inode, newparent, newname).map(|e| self.made(e))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        if self.read_only && (flags as i32) & WRITE_OPEN_FLAGS != 0 {
            return Err(erofs());
        }
        check_open_flags(flags)?;
        let (handle, mut opts, passthrough) =
            self.with_handle(|| self.inner.open(ctx, inode, flags, fuse_flags), |r| r.0)?;
        if let Some(v) = &self.versions {
            // The version is read through the new handle, so it is the opened file's.
            if !opts.contains(OpenOptions::DIRECT_IO) {
                if let Ok((st, _)) = self.inner.getattr(ctx, inode, handle) {
                    if v.unchanged(inode, FileVersion::of(&st)) {
                        opts |= OpenOptions::KEEP_CACHE;
                    }
                }
            }
        }
        Ok((handle, opts, passthrough))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        self.check_writable()?;
        check_open_flags(args.flags)?;
        self.check_inode_room()?;
        let (entry, handle, opts, passthrough) =
            self.with_handle(|| self.inner.create(ctx, parent, name, args), |r| r.1)?;
        Ok((self.made(entry), handle, opts, passthrough))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner.read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.check_writable()?;
        self.inner.write(ctx, inode, handle, r, size, offset, lock_owner, delayed_write, flags, fuse_flags)
    }

    fn flush(&self, ctx: &Context, inode: Inode, handle: Handle, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.inner.fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner.release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.handles.release();
        Ok(())
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(&self, ctx: &Context, inode: Inode, name: &CStr, value: &[u8], flags: u32) -> io::Result<()> {
        self.check_writable()?;
        if !is_user_xattr(name.to_bytes()) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(&self, ctx: &Context, inode: Inode, name: &CStr, size: u32) -> io::Result<GetxattrReply> {
        if !is_user_xattr(name.to_bytes()) {
            return Err(io::Error::from_raw_os_error(libc::ENODATA));
        }
        // The passthrough allocates the size the guest names (up to 4 GiB) before asking the
        // host; no value is longer than this anyway.
        self.inner.getxattr(ctx, inode, name, size.min(MAX_XATTR_SIZE))
    }

    fn listxattr(&self, ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        // Fetch every name, then show the guest only the user namespace.
        let names = match self.inner.listxattr(ctx, inode, XATTR_LIST_MAX)? {
            ListxattrReply::Names(n) => n,
            ListxattrReply::Count(_) => return Err(io::Error::from_raw_os_error(libc::EIO)),
        };
        let visible: Vec<u8> =
            names.split_inclusive(|b| *b == 0).filter(|n| is_user_xattr(n)).flatten().copied().collect();
        match size {
            0 => Ok(ListxattrReply::Count(visible.len() as u32)),
            s if visible.len() > s as usize => Err(io::Error::from_raw_os_error(libc::ERANGE)),
            _ => Ok(ListxattrReply::Names(visible)),
        }
    }

    fn removexattr(&self, ctx: &Context, inode: Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        if !is_user_xattr(name.to_bytes()) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(&self, ctx: &Context, inode: Inode, flags: u32) -> io::Result<(Option<Handle>, OpenOptions)> {
        check_open_flags(flags)?;
        self.with_handle(|| self.inner.opendir(ctx, inode, flags), |r| r.0)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner.readdir(ctx, inode, handle, size.min(MAX_READDIR_SIZE), offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // Each entry is a lookup, counted as one; the passthrough takes it back itself when
        // the entry does not fit (Ok(0)).
        let mut counted = |d: DirEntry, e: Entry| {
            let ino = e.inode;
            if ino == ROOT_ID || self.inodes.try_add(ino) {
                let r = add_entry(d, e);
                if ino != ROOT_ID && matches!(r, Ok(0)) {
                    self.inodes.forget(ino, 1);
                }
                return r;
            }
            // At the cap the name is still listed, without a lookup: node id 0 tells the
            // kernel there are no attributes (a later lookup of it gets ENFILE).
            self.inner.forget(ctx, ino, 1);
            self.warn_inode_cap();
            add_entry(
                d,
                Entry {
                    inode: 0,
                    generation: 0,
                    attr_timeout: Duration::ZERO,
                    entry_timeout: Duration::ZERO,
                    ..e
                },
            )
        };
        self.inner.readdirplus(ctx, inode, handle, size.min(MAX_READDIR_SIZE), offset, &mut counted)
    }

    fn fsyncdir(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: Inode, flags: u32, handle: Handle) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.handles.release();
        Ok(())
    }

    // DAX windows are not offered (no shared memory region), and the server refuses these
    // requests before reaching the file system when it is given no cache handler; they are
    // refused here as well so that stays true whatever the server does.
    fn setupmapping(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _handle: Handle,
        _foffset: u64,
        _len: u64,
        _flags: u64,
        _moffset: u64,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    fn removemapping(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _requests: Vec<RemovemappingOne>,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        if self.read_only && mask & (libc::W_OK as u32) != 0 {
            return Err(erofs());
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}

/// Largest xattr name list Linux returns (XATTR_LIST_MAX).
const XATTR_LIST_MAX: u32 = 65536;

/// Guests get the `user.` namespace only: `security.*` (file capabilities, LSM labels) and
/// `trusted.*` would let a guest plant attributes that the host kernel honours.
fn is_user_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.")
}
