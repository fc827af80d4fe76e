//! The control socket: a Unix stream socket (`--control PATH`, bound before the jail) that
//! takes one command per connection, a line of text, and answers one line:
//!
//! - `snapshot` pauses the VM and writes `state` and `memory` into the `--snapshot-dir`
//!   directory; the answer is `ok` and the VMM then exits with status 0 (the VM stays paused
//!   for good: a base snapshot's VM has served its purpose), or `error: <why>` and the VM
//!   runs on as before (for instance while a vsock stream is open or a share is mounted).
//! - `working-set` (a restored VM only) records the guest pages the VM has touched so far
//!   into a `working-set` file in the `--snapshot-dir` directory (see [`super::working_set`]),
//!   which the caller checks and puts into the snapshot (the VMM never writes there); the
//!   answer is `ok <pages> pages, <written> written`. A restored VM refuses `snapshot`: its
//!   memory is a sandbox's, never a base for others.
//! - `ping` answers `ok`.
//!
//! A dedicated thread serves it, confined like every other (its filter allows the snapshot's
//! file writes and KVM's VM-state reads); vCPUs save their own state when parked.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::state::Snapshot;
use super::working_set::{WorkingSet, WORKING_SET_FILE};
use super::{file, kvm_state, memory, Identity, SnapshotError, MEMORY_FILE, STATE_FILE};
use crate::devices::legacy::SerialConsole;
use crate::devices::virtio::MmioTransport;
use crate::exit::{ExitNotifier, ExitReason};
use crate::memory::GuestMem;
use crate::vstate::vcpu::PauseCtl;
use crate::vstate::Vm;

/// How long a vCPU may take to leave KVM_RUN (the L1 test host is slow).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_COMMAND: u64 = 256;

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}

/// The control socket and snapshot directory, opened while the VMM can still reach them.
#[derive(Debug)]
pub struct ControlEndpoint {
    listener: UnixListener,
    path: PathBuf,
    dir: Option<File>,
    /// This process's page table, for `working-set` (a restored VM's only).
    pagemap: Option<File>,
    restored: bool,
}

impl ControlEndpoint {
    /// The descriptors it holds (they must outlive the jail's closing of inherited ones).
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        let mut v = vec![self.listener.as_raw_fd()];
        v.extend(self.dir.as_ref().map(|d| d.as_raw_fd()));
        v.extend(self.pagemap.as_ref().map(|d| d.as_raw_fd()));
        v
    }

    /// Binds `path` (replacing a stale socket) and opens `dir` if given.
    /// `restored`: the VM starts from the snapshot in `dir` (which then takes `working-set`,
    /// not `snapshot`).
    pub fn bind(path: &Path, dir: Option<&Path>, restored: bool) -> Result<Self, SnapshotError> {
        if path.exists() {
            std::fs::remove_file(path).map_err(io("remove stale control socket"))?;
        }
        let listener = UnixListener::bind(path).map_err(io("bind control socket"))?;
        let dir = dir
            .map(|d| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY)
                    .open(d)
                    .map_err(io("open snapshot directory"))
            })
            .transpose()?;
        // Without it (a /proc that hides it) the VM runs as ever and `working-set` says why not.
        let pagemap = restored
            .then(|| {
                File::open("/proc/self/pagemap")
                    .map_err(|e| tracing::warn!("no working set can be recorded: /proc/self/pagemap: {e}"))
                    .ok()
            })
            .flatten();
        Ok(Self { listener, path: path.to_path_buf(), dir, pagemap, restored })
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// Everything a snapshot reads.
#[derive(Debug)]
pub struct SnapshotSources {
    pub vm: Arc<Vm>,
    pub mem: GuestMem,
    pub vcpus: Vec<Arc<PauseCtl>>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub serial: Option<Arc<Mutex<SerialConsole>>>,
    pub identity: Identity,
    pub exit: Arc<ExitNotifier>,
}

/// Starts the control thread; it confines itself before it serves anything.
pub fn start(endpoint: ControlEndpoint, sources: SnapshotSources) -> std::io::Result<()> {
    let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new().name("control".into()).spawn(move || {
        let confined = crate::confine::confine_thread(crate::confine::ThreadKind::Control);
        let ok = confined.is_ok();
        let _ = ready_tx.send(confined.map_err(|e| e.to_string()));
        if ok {
            serve(&endpoint, &sources);
        }
    })?;
    match ready.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(_) => Err(std::io::Error::other("control thread died starting")),
    }
}

fn serve(ep: &ControlEndpoint, src: &SnapshotSources) {
    loop {
        let stream = match ep.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return tracing::error!("control socket {}: {e}", ep.path.display()),
        };
        if handle(ep, src, stream) {
            return;
        }
    }
}

/// Serves one connection; true when the VMM is to stop.
fn handle(ep: &ControlEndpoint, src: &SnapshotSources, mut stream: UnixStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let read = match stream.try_clone() {
        Ok(s) => BufReader::new(std::io::Read::take(s, MAX_COMMAND)).read_line(&mut line),
        Err(e) => Err(e),
    };
    let (reply, stop) = match read.as_ref().map(|_| line.trim()) {
        Ok("ping") => ("ok".to_string(), false),
        Ok("snapshot") if ep.restored => {
            ("error: a restored VM is not snapshotted (its memory is its sandbox's)".to_string(), false)
        }
        Ok("working-set") => match record_working_set(ep, src) {
            Ok((all, written)) => (format!("ok {all} pages, {written} written"), false),
            Err(e) => (format!("error: {e}"), false),
        },
        Ok("snapshot") => {
            let started = Instant::now();
            match take_snapshot(ep, src) {
                Ok(()) => {
                    tracing::info!(ms = started.elapsed().as_millis() as u64, "snapshot written");
                    ("ok".to_string(), true)
                }
                Err(e) => (format!("error: {e}"), false),
            }
        }
        Ok(other) => {
            (format!("error: unknown command {other:?} (expected snapshot, working-set or ping)"), false)
        }
        Err(e) => (format!("error: reading the command: {e}"), false),
    };
    let _ = stream.write_all(format!("{reply}\n").as_bytes());
    drop(stream);
    if stop {
        src.exit.notify(ExitReason::Snapshotted);
    }
    stop
}

/// Records the restored VM's touched pages into a working set file in the control directory
/// (replacing any, atomically).
fn record_working_set(ep: &ControlEndpoint, src: &SnapshotSources) -> Result<(u64, u64), SnapshotError> {
    let (Some(dir), true) = (&ep.dir, ep.restored) else {
        return Err(SnapshotError::Refused("working-set is for a restored VM with a --snapshot-dir".into()));
    };
    let Some(pagemap) = &ep.pagemap else {
        return Err(SnapshotError::Refused("/proc/self/pagemap could not be opened".into()));
    };
    let ws = WorkingSet::record(&src.mem, pagemap)?;
    let f = create_at(dir, "working-set.tmp")?;
    std::os::unix::fs::FileExt::write_all_at(&f, &ws.encode(), 0).map_err(io("write working set"))?;
    f.sync_all().map_err(io("sync working set"))?;
    rename_at(dir, "working-set.tmp", WORKING_SET_FILE)?;
    Ok(ws.pages())
}

fn take_snapshot(ep: &ControlEndpoint, src: &SnapshotSources) -> Result<(), SnapshotError> {
    let dir =
        ep.dir.as_ref().ok_or_else(|| SnapshotError::Refused("husk-vmm has no --snapshot-dir".into()))?;
    // Cheap refusals first, while nothing is stopped yet.
    for t in &src.transports {
        t.lock().unwrap_or_else(|p| p.into_inner()).snapshot_ready().map_err(SnapshotError::Refused)?;
    }
    let mut vcpus = Vec::with_capacity(src.vcpus.len());
    for (i, ctl) in src.vcpus.iter().enumerate() {
        match ctl.pause(PAUSE_TIMEOUT) {
            Ok(s) => vcpus.push(s),
            Err(e) => {
                src.vcpus.iter().for_each(|c| c.resume());
                return Err(SnapshotError::Refused(format!("vCPU {i}: {e}")));
            }
        }
    }
    let mut stopped = 0;
    let result = save_paused(dir, src, vcpus, &mut stopped);
    if result.is_err() {
        for t in &src.transports[..stopped] {
            t.lock().unwrap_or_else(|p| p.into_inner()).resume_after_save();
        }
        src.vcpus.iter().for_each(|c| c.resume());
    }
    result
}

fn save_paused(
    dir: &File,
    src: &SnapshotSources,
    vcpus: Vec<super::state::VcpuState>,
    stopped: &mut usize,
) -> Result<(), SnapshotError> {
    // The guest cannot open a stream now, but the host side still can: check again.
    let mut devices = Vec::with_capacity(src.transports.len());
    for t in &src.transports {
        let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
        t.snapshot_ready().map_err(SnapshotError::Refused)?;
        devices.push(t.save());
        *stopped += 1;
    }
    // After the devices: an interrupt they raised on the way out is in the irqchip now.
    let vm = kvm_state::save_vm(src.vm.fd())?;
    let serial = src.serial.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).save());
    let mem_file = create_at(dir, "memory.tmp")?;
    let memory = memory::write(&src.mem, &mem_file)?;
    mem_file.sync_all().map_err(io("sync memory file"))?;
    let vmgenid =
        crate::devices::vmgenid::save(&src.mem).map_err(|e| SnapshotError::Refused(format!("{e}")))?;
    let snap = Snapshot { identity: src.identity.clone(), memory, vm, vcpus, devices, serial, vmgenid };
    let bytes = file::encode(&snap)?;
    let state_file = create_at(dir, "state.tmp")?;
    std::os::unix::fs::FileExt::write_all_at(&state_file, &bytes, 0).map_err(io("write state file"))?;
    state_file.sync_all().map_err(io("sync state file"))?;
    // The state file goes last: a directory with `state` in it is a complete snapshot.
    rename_at(dir, "memory.tmp", MEMORY_FILE)?;
    rename_at(dir, "state.tmp", STATE_FILE)?;
    dir.sync_all().map_err(io("sync snapshot directory"))?;
    Ok(())
}

fn cstr(s: &str) -> Result<CString, SnapshotError> {
    CString::new(s).map_err(|_| SnapshotError::Encode(format!("file name {s:?}")))
}

fn create_at(dir: &File, name: &str) -> Result<File, SnapshotError> {
    let c = cstr(name)?;
    // SAFETY: openat with a valid directory fd and NUL-terminated name; the fd it returns is
    // owned by the File made from it.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_CREAT | libc::O_TRUNC | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o600,
        )
    };
    if fd < 0 {
        return Err(SnapshotError::Io {
            what: "create snapshot file",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn rename_at(dir: &File, from: &str, to: &str) -> Result<(), SnapshotError> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: both names are NUL-terminated and relative to the same valid directory fd.
    let r = unsafe { libc::renameat(dir.as_raw_fd(), f.as_ptr(), dir.as_raw_fd(), t.as_ptr()) };
    if r != 0 {
        return Err(SnapshotError::Io {
            what: "rename snapshot file",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
