//! virtio-fs (spec 5.11): serves one host directory to the guest under a mount tag
//! (`mount -t virtiofs TAG /mnt`). Requests are FUSE messages carried in descriptor chains;
//! fuse-backend-rs decodes them (`Server`) and runs them against the host directory
//! (`PassthroughFs`, wrapped in [`ShareFs`] for read-only shares).
//!
//! Containment: the passthrough keeps an `O_PATH` fd per inode the guest has looked up and
//! resolves every name with `openat(parent_fd, name, O_NOFOLLOW)` on a single component (names
//! with `/` are refused, `..` at the root is turned into `.`), so the guest walks the tree one
//! real directory at a time and never follows a symlink on the host; only regular files and
//! directories are ever reopened for I/O (through `/proc/self/fd`). The share root is
//! canonicalized when the device is made, so a symlinked share path is fixed at start-up.
//!
//! Every chain the guest makes available is completed: malformed requests either get a FUSE
//! error reply from the server or are marked used with length 0.
//!
//! Bounds: the inodes the guest holds looked up and the files it holds open are capped
//! ([`limits`]; the passthrough has no limit of its own), so it cannot use up the VMM's file
//! descriptors.

mod filter;
mod keep_cache;
pub mod limits;
#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config as PassthroughConfig, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

pub use self::filter::ShareFs;
use self::limits::Limits;
use super::device::{check_queue_count, read_config_bytes, Worker};
use super::{ActivateContext, ActivateError, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1};
use crate::config::{FsCache, FsShareConfig};
use crate::confine::ThreadKind;
use crate::memory::GuestMem;

/// Size of the tag field in the config space; shorter tags are NUL padded.
pub const TAG_LEN: usize = crate::config::MAX_FS_TAG_LEN;
pub const QUEUE_SIZE: u16 = 1024;
/// One high-priority queue (FORGET, INTERRUPT) and this many request queues.
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Chains served from one queue before the worker looks at its kill event again, so a guest
/// that keeps its queue full cannot keep a reset waiting.
pub const MAX_CHAINS_PER_PASS: usize = QUEUE_SIZE as usize;

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
const CONFIG_LEN: usize = TAG_LEN + 4;
const TOKEN_KILL: u64 = u64::MAX;

type FsServer = Server<Arc<ShareFs>>;

pub struct Fs {
    config: [u8; CONFIG_LEN],
    fs: Arc<ShareFs>,
    server: Arc<FsServer>,
    worker: Worker,
    /// Requests served since activation: any means the guest mounted the share.
    served: Arc<AtomicU64>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs").field("fs", &self.fs).field("worker", &self.worker).finish_non_exhaustive()
    }
}

/// Maps the share's cache option onto the passthrough's policy and timeouts (the same meaning
/// as virtiofsd's `cache=`): `never` revalidates everything, `auto` trusts attributes for a
/// second, `always` assumes nobody else changes the directory.
fn passthrough_config(root_dir: String, cache: FsCache) -> PassthroughConfig {
    let cache_policy = match cache {
        FsCache::Never => CachePolicy::Never,
        FsCache::Auto => CachePolicy::Auto,
        FsCache::Always => CachePolicy::Always,
    };
    let timeout = name_timeout(cache);
    PassthroughConfig {
        root_dir,
        cache_policy,
        attr_timeout: timeout,
        entry_timeout: timeout,
        // Set explicitly: these are the settings the containment notes above rely on.
        do_import: true,
        inode_file_handles: false,
        // Filtered to the user namespace by ShareFs.
        xattr: true,
        writeback: false,
        no_open: false,
        // FUSE_NO_OPENDIR_SUPPORT where the kernel offers it: the first OPENDIR gets ENOSYS
        // and no directory open or release is a round trip after it (a container's start
        // opened each of its mount points: 8 of its requests). READDIR opens the directory
        // for itself, so no guest-held handle keeps a host fd open either.
        no_opendir: true,
        // FUSE_HANDLE_KILLPRIV_V2: the guest kernel leaves clearing setuid/setgid to the server
        // and flags the requests that must clear them (WRITE, truncating SETATTR, OPEN with
        // O_TRUNC and CREATE whose caller lacks CAP_FSETID; every chown). The passthrough drops
        // CAP_FSETID on the serving thread for a flagged request, since this server holds it
        // and the host kernel would otherwise keep the bits. Without it the guest clears them
        // itself with a separate SETATTR, racing with other writers.
        killpriv_v2: true,
        ..Default::default()
    }
}

/// How long the guest may trust a name (found or not) and its attributes.
fn name_timeout(cache: FsCache) -> Duration {
    match cache {
        FsCache::Never => Duration::ZERO,
        FsCache::Auto => Duration::from_secs(1),
        FsCache::Always => Duration::from_secs(86_400),
    }
}

/// Every inode the guest looks up holds an `O_PATH` fd, so the common 1024 soft limit would
/// turn a `find` over a large share into EMFILE; take the hard limit instead, as virtiofsd does.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::debug!("virtio-fs: setrlimit(NOFILE): {}", io::Error::last_os_error());
            }
        }
    }
}

/// Sets up the calling thread to serve a share; the device's worker runs it before its first
/// request (and before it is confined).
///
/// The passthrough sets the umask to 0 when it imports the root (FUSE_INIT, FUSE_DESTROY) and
/// relies on it staying 0: it applies the guest's umask to guest-chosen modes itself, so any
/// other umask would strip bits the guest asked for. `unshare(CLONE_FS)` gives this thread its
/// own umask (and its own copy of the cwd and root, the ones the process has now, jail
/// included), so that 0 never applies to files the rest of the VMM creates.
pub(crate) fn prepare_server_thread() -> io::Result<()> {
    // SAFETY: unshare(CLONE_FS) takes no pointers; it only gives this thread a private copy of
    // the process's umask, cwd and root. The fd table and memory stay shared.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: umask(2) takes no pointers and cannot fail; after the unshare it sets this
    // thread's mask only.
    unsafe { libc::umask(0) };
    Ok(())
}

impl Fs {
    /// Opens the share; the config must have been validated (tag length, directory path).
    ///
    /// A relative path is the jail's (`shares/<n>`, see `jail`): the passthrough opens its
    /// root again at every FUSE_INIT, which comes after the pivot, and that path names the
    /// share's bind mount both from the jail directory before it and from `/` after it.
    pub fn new(share: &FsShareConfig) -> io::Result<Self> {
        let root =
            if share.path.is_relative() { share.path.clone() } else { std::fs::canonicalize(&share.path)? };
        if !root.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a directory"));
        }
        // Fail now, not at the guest's first mount, if the directory cannot be listed.
        std::fs::read_dir(&root)?;
        let root_dir = root
            .to_str()
            .filter(|s| !s.contains('\0'))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path is not valid UTF-8"))?
            .to_string();
        let inner = PassthroughFs::new(passthrough_config(root_dir, share.cache))?;
        raise_nofile_limit();
        let limits = Limits::fitted_to_process();
        if limits != Limits::default() {
            tracing::info!("virtio-fs {}: RLIMIT_NOFILE caps the share at {limits:?}", share.tag);
        }
        let mut fs = ShareFs::with_limits(inner, share.read_only, limits);
        if share.cache == FsCache::Auto {
            fs = fs.keeping_unchanged_files_cached();
        }
        let timeout = name_timeout(share.cache);
        if !timeout.is_zero() {
            fs = fs.caching_names(timeout);
        }
        Self::with_fs(&share.tag, fs)
    }

    fn with_fs(tag: &str, fs: ShareFs) -> io::Result<Self> {
        if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad virtio-fs tag"));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        let fs = Arc::new(fs);
        let server = Arc::new(Server::new(fs.clone()));
        let worker = Worker::new("virtio-fs", ThreadKind::VirtioFs);
        Ok(Self { config, fs, server, worker, served: Arc::new(AtomicU64::new(0)) })
    }

    /// The FUSE server the device's queues are served by, for driving [`process_queue`]
    /// without a worker thread (the fuzz targets in `vmm/fuzz` do).
    pub fn server(&self) -> &Server<Arc<ShareFs>> {
        &self.server
    }
}

/// Runs one request. Returns the number of bytes written to the chain's device-writable part;
/// 0 when the chain could not be mapped or the server produced no reply.
fn handle_chain<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
) -> u32 {
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!("virtio-fs: unusable request buffers: {e}");
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!("virtio-fs: unusable reply buffers: {e}");
            return 0;
        }
    };
    match server.handle_message(reader, Writer::VirtioFs(writer), None, None) {
        // The count is bounded by the writable buffers, themselves bounded by guest memory.
        Ok(n) => u32::try_from(n).unwrap_or(0),
        Err(e) => {
            tracing::debug!("virtio-fs: request dropped: {e}");
            0
        }
    }
}

/// Serves up to `budget` available chains. Returns how many were completed and whether the
/// budget ran out (more may be waiting).
pub fn process_queue<F: FileSystem + Sync>(
    queue: &mut Queue,
    mem: &GuestMem,
    server: &Server<F>,
    budget: usize,
) -> (usize, bool) {
    let mut completed = 0;
    while completed < budget {
        let Some(chain) = queue.pop_descriptor_chain(mem) else { return (completed, false) };
        let head = chain.head_index();
        let len = handle_chain(server, mem, chain);
        if let Err(e) = queue.add_used(mem, head, len) {
            tracing::debug!("virtio-fs: add_used: {e}");
            return (completed, false);
        }
        completed += 1;
    }
    (completed, true)
}

fn run_worker(ctx: ActivateContext, server: Arc<FsServer>, served: Arc<AtomicU64>, kill: EventFd) {
    let ActivateContext { mem, mut queues, queue_evts, interrupt, .. } = ctx;
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => return tracing::error!("virtio-fs: epoll: {e}"),
    };
    let sources = queue_evts.iter().enumerate().map(|(i, evt)| (evt, i as u64));
    for (fd, token) in sources.chain([(&kill, TOKEN_KILL)]) {
        if let Err(e) = epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
        {
            return tracing::error!("virtio-fs: epoll_ctl: {e}");
        }
    }
    let mut events = vec![EpollEvent::default(); queue_evts.len() + 1];
    let mut more = false;
    loop {
        // With work left over from the last pass, only peek at the events.
        let n = match epoll.wait(if more { 0 } else { -1 }, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return tracing::error!("virtio-fs: epoll_wait: {e}"),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_KILL => return,
                i => {
                    if let Some(evt) = queue_evts.get(i as usize) {
                        let _ = evt.read();
                    }
                }
            }
        }
        // Both queues are cheap to poll, so every wake-up serves both, high priority first.
        more = false;
        let mut notify = false;
        for queue in queues.iter_mut() {
            let (done, left) = process_queue(queue, &mem, &server, MAX_CHAINS_PER_PASS);
            more |= left;
            served.fetch_add(done as u64, Ordering::Relaxed);
            notify |= done > 0 && queue.needs_notification(&mem).unwrap_or(true);
        }
        if notify {
            interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        check_queue_count(&ctx, QUEUE_SIZES.len())?;
        self.reset();
        let server = self.server.clone();
        let served = self.served.clone();
        self.worker.start(move |kill| run_worker(ctx, server, served, kill))
    }

    fn start_threads(&mut self) -> Result<(), ActivateError> {
        self.worker.start_thread()
    }

    fn reset(&mut self) {
        if self.worker.is_running() {
            self.worker.stop();
            // The driver starts over with FUSE_INIT: drop every inode and open file it held.
            // On the server thread: the caller (a vCPU, or main at teardown) may neither open
            // files nor touch the umask under its seccomp filter.
            let fs = self.fs.clone();
            if let Err(e) = self.worker.run_and_wait(move || fs.destroy()) {
                tracing::error!("virtio-fs: reset: {e}");
            }
        }
        self.served.store(0, Ordering::Relaxed);
    }

    fn snapshot_ready(&self) -> Result<(), String> {
        // Not mounted since activation: no FUSE session exists, and the restored VM's mount
        // starts one with its own share.
        match self.served.load(Ordering::Relaxed) {
            0 => Ok(()),
            n => Err(format!("virtio-fs share has served {n} requests (it is or was mounted)")),
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.reset();
    }
}
