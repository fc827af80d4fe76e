//! The snapshot cache: sandbox VMs start from a snapshot of a booted guest whose agent is
//! ready, made once per kernel, initramfs, VMM, command line and VM shape.
//!
//! A snapshot lives in `<root>/<key>/` (`state`, `memory` as husk-vmm writes them, plus
//! `meta.json`). The key is a digest of everything the saved guest depends on: the contents of
//! the kernel, initramfs and husk-vmm binary, the command line, memory, vCPUs, the shares' tags
//! and modes, and the host kernel and CPU (KVM state does not move between those). Any change
//! gives another key, so a stale snapshot is never picked; the new entry's maker removes the
//! entries it supersedes (same command line and shape, older inputs).
//!
//! A snapshot is made by booting a template VM that never serves a sandbox (nothing mounted,
//! no container ever ran in it: it holds only what husk shipped), waiting for its agent,
//! closing that connection and asking the VMM over its control socket to save itself. Every
//! restored VM then gets its own shares and socket (a virtio-fs session starts at mount).
//! A networked sandbox's snapshot has one virtio-net device per pod interface, detached in the
//! template and each with a placeholder MAC; a restored VM gets the pod's taps in their place,
//! and its agent gives the guest's links the pod's MACs (see [`placeholder_mac`]).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::spawn::{spawn, Spawn};
use super::{ExtraShare, VmExit, VmProcess, VmShape};
use crate::agent::GrpcAgent;
use crate::config::Config;
use crate::uds;

/// The layout of a cache entry; part of the key, so a new layout never reads an old entry.
const CACHE_FORMAT: u32 = 1;
/// Files read whole to hash them are bounded (a guest kernel is tens of MiB).
const MAX_HASHED_FILE: u64 = 1 << 30;
/// How long a template VM may take to save itself once its agent answered.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(120);
/// How long an open vsock stream (the health check just closed) may keep a snapshot refused.
const STREAM_DRAIN: Duration = Duration::from_secs(10);
/// The fd a template VMM inherits its working directory at, for long paths.
const WORK_DIR_FD: i32 = 3;
/// How long recording a working set may take (a page table read and a small file written).
const WORKING_SET_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the template VM: {0}")]
    Template(String),
    #[error("the snapshot's working set: {0}")]
    WorkingSet(String),
    #[error("the template VM's agent: {0}")]
    Agent(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Io { what, source }
}

/// What a snapshot depends on; its digest is the cache key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInputs {
    pub format: u32,
    pub vmm_sha256: String,
    pub kernel_sha256: String,
    pub initramfs_sha256: String,
    pub cmdline: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The extra shares' tags and whether each is read-only (the sandbox share is always there).
    pub shares: Vec<(String, bool)>,
    /// virtio-net devices: one per pod interface.
    #[serde(default)]
    pub nics: usize,
    pub host_kernel: String,
    pub host_cpu: String,
}

impl KeyInputs {
    /// 128 bits of the inputs' digest, in hex: short enough for socket paths under the root.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex(&Sha256::digest(&json)[..16])
    }
}

/// `meta.json` of a cache entry: what it was made from, for `husk snapshot list` and people.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub key: String,
    pub inputs: KeyInputs,
    /// Unix seconds.
    pub created: u64,
    /// How long making it took, cold boot included.
    pub prepare_ms: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The most pod interfaces a snapshot is made for (the agent takes no more).
pub const MAX_NICS: usize = 16;

/// The pages a VM restored from a snapshot touches while its sandbox and first container are
/// set up, which later restores map in before the guest runs (a file in the snapshot's
/// directory, written by the VMM).
pub use husk_vmm::snapshot::working_set::WORKING_SET_FILE;

/// Whether a VM of `shape` can start from a snapshot at all.
pub fn eligible(shape: &VmShape) -> bool {
    nics(shape) <= MAX_NICS
}

fn nics(shape: &VmShape) -> usize {
    shape.network.as_ref().map_or(0, |w| w.links.len())
}

/// The MAC a snapshot's `i`th virtio-net device has in its guest until the agent gives the
/// link its pod interface's (locally administered: "husk" and the device's place).
pub fn placeholder_mac(i: usize) -> [u8; 6] {
    [0x02, 0x68, 0x75, 0x73, 0x6b, i as u8]
}

/// The inputs of the snapshot a VM of `shape` with `nics` virtio-net devices would start from.
fn key_inputs(cfg: &Config, shape: &VmShape, nics: usize) -> Result<KeyInputs, SnapshotError> {
    let digests = DigestCache::new(&cfg.snapshot_root());
    Ok(KeyInputs {
        format: CACHE_FORMAT,
        vmm_sha256: digests.sha256(&cfg.vmm)?,
        kernel_sha256: digests.sha256(&cfg.kernel)?,
        initramfs_sha256: digests.sha256(&cfg.initramfs)?,
        cmdline: cfg.cmdline.clone(),
        memory_mib: shape.memory_mib,
        vcpus: shape.vcpus,
        shares: shape.extra_shares.iter().map(|s| (s.tag.clone(), s.read_only)).collect(),
        nics,
        host_kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().into(),
        host_cpu: host_cpu(),
    })
}

/// The host CPU's model line: KVM's CPUID and MSR state is only good on the same kind of CPU.
fn host_cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    format!("{} / {} / {} / {}", field("vendor_id"), field("cpu family"), field("model"), field("model name"))
}

/// File digests remembered by (device, inode, size, mtime), so each run stats the kernel and
/// initramfs instead of reading them.
struct DigestCache {
    dir: PathBuf,
}

impl DigestCache {
    fn new(root: &Path) -> Self {
        Self { dir: root.join("digests") }
    }

    fn sha256(&self, path: &Path) -> Result<String, SnapshotError> {
        let md = std::fs::metadata(path).map_err(io(format!("{}", path.display())))?;
        let stamp = format!("{} {} {} {}.{}", md.dev(), md.ino(), md.size(), md.mtime(), md.mtime_nsec());
        let name = hex(&Sha256::digest(path.as_os_str().as_encoded_bytes())[..16]);
        let entry = self.dir.join(name);
        if let Ok(text) = std::fs::read_to_string(&entry) {
            if let Some((s, d)) = text.trim().rsplit_once(' ') {
                if s == stamp && d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Ok(d.to_string());
                }
            }
        }
        if md.size() > MAX_HASHED_FILE {
            return Err(SnapshotError::Template(format!("{} is larger than 1 GiB", path.display())));
        }
        let mut f = File::open(path).map_err(io(format!("{}", path.display())))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io(format!("reading {}", path.display())))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let digest = hex(&h.finalize());
        // Best effort: a cache that cannot be written only costs a re-read next time.
        if mkdirs(&self.dir).is_ok() {
            let tmp = self.dir.join(format!(".tmp-{}", std::process::id()));
            if std::fs::write(&tmp, format!("{stamp} {digest}\n")).is_ok() {
                let _ = std::fs::rename(&tmp, &entry);
            }
        }
        Ok(digest)
    }
}

fn mkdirs(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("creating {}", dir.display())))
}

/// The cache entry for `key`, if it is complete.
pub fn lookup(root: &Path, key: &str) -> Option<PathBuf> {
    let dir = root.join(key);
    (dir.join("state").is_file() && dir.join("memory").is_file() && dir.join("meta.json").is_file())
        .then_some(dir)
}

/// Removes an entry that turned out unusable (it is made again on next use).
pub fn discard(dir: &Path) {
    // Renamed first, so no other process picks it up while it is being removed.
    let aside = dir.with_extension(format!("discarded-{}", std::process::id()));
    if std::fs::rename(dir, &aside).is_ok() {
        let _ = std::fs::remove_dir_all(&aside);
    }
}

/// Removes the directories under `root` whose names start with `prefix`.
fn remove_stale(root: &Path, prefix: &str) {
    let Ok(rd) = std::fs::read_dir(root) else { return };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Removes every entry and every leftover of an interrupted make or discard; what remains is
/// the digest cache and the lock files. Returns how many entries went.
pub fn remove_all(root: &Path) -> usize {
    let n = list(root).len();
    let Ok(rd) = std::fs::read_dir(root) else { return 0 };
    for e in rd.flatten() {
        let name = e.file_name();
        if name != "digests" && name != "locks" && e.path().is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    n
}

/// Entries the new one replaces: the same command line and VM shape, made from another
/// kernel, initramfs or husk-vmm, or on another host kernel or CPU, which no VM will ask for
/// again (an upgrade). Entries for other command lines or shapes are still in use and stay.
fn superseded(root: &Path, new: &Meta) -> Vec<PathBuf> {
    let same_use = |i: &KeyInputs| {
        (i.format, &i.cmdline, i.memory_mib, i.vcpus, &i.shares, i.nics)
            == (
                new.inputs.format,
                &new.inputs.cmdline,
                new.inputs.memory_mib,
                new.inputs.vcpus,
                &new.inputs.shares,
                new.inputs.nics,
            )
    };
    list(root)
        .into_iter()
        .filter_map(|(dir, meta)| {
            let m = meta?;
            (m.key != new.key && same_use(&m.inputs)).then_some(dir)
        })
        .collect()
}

/// Every complete entry under `root`, with its metadata.
pub fn list(root: &Path) -> Vec<(PathBuf, Option<Meta>)> {
    let Ok(rd) = std::fs::read_dir(root) else { return Vec::new() };
    let mut out: Vec<(PathBuf, Option<Meta>)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            n.len() == 32 && n.as_encoded_bytes().iter().all(u8::is_ascii_hexdigit)
        })
        .map(|e| {
            let meta =
                std::fs::read(e.path().join("meta.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
            (e.path(), meta)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The snapshot for a VM of `shape`: the cached one, or one made now. `Ok(None)` when the
/// shape does not take snapshots.
pub async fn ensure(cfg: &Config, shape: &VmShape) -> Result<Option<PathBuf>, SnapshotError> {
    if !eligible(shape) {
        return Ok(None);
    }
    ensure_with_nics(cfg, shape, nics(shape)).await.map(Some)
}

/// The snapshot for VMs of `shape` (its own network aside) with `nics` pod interfaces, as
/// [`ensure`] finds or makes it; for making one ahead of time (`husk snapshot prepare`).
pub async fn ensure_with_nics(cfg: &Config, shape: &VmShape, nics: usize) -> Result<PathBuf, SnapshotError> {
    if nics > MAX_NICS {
        return Err(SnapshotError::Template(format!("{nics} network devices: at most {MAX_NICS}")));
    }
    let root = cfg.snapshot_root();
    let inputs = key_inputs(cfg, shape, nics)?;
    let key = inputs.key();
    if let Some(dir) = lookup(&root, &key) {
        return Ok(dir);
    }
    // One maker per key; the others wait and then use what it made.
    let locks = root.join("locks");
    mkdirs(&locks)?;
    let lock_path = locks.join(&key);
    let lock = tokio::task::spawn_blocking(move || -> Result<Flock<File>, SnapshotError> {
        let f = File::create(&lock_path).map_err(io(format!("creating {}", lock_path.display())))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| SnapshotError::Io {
            what: format!("locking {}", lock_path.display()),
            source: e.into(),
        })
    })
    .await
    .map_err(|e| SnapshotError::Template(format!("lock task: {e}")))??;
    if let Some(dir) = lookup(&root, &key) {
        return Ok(dir);
    }
    let made = make(cfg, shape, &root, &key, inputs).await;
    drop(lock);
    made
}

/// Boots a template VM of `shape`, waits for its agent, snapshots it into `<root>/<key>`.
async fn make(
    cfg: &Config,
    shape: &VmShape,
    root: &Path,
    key: &str,
    inputs: KeyInputs,
) -> Result<PathBuf, SnapshotError> {
    let started = Instant::now();
    // Under the key's lock, any other work directory of this key is a dead maker's.
    remove_stale(root, &format!("{key}.tmp-"));
    let work = root.join(format!("{key}.tmp-{}", std::process::id()));
    let snap = work.join("snapshot");
    for d in [&work, &work.join("shared"), &snap] {
        mkdirs(d)?;
    }
    let mut template = shape.clone();
    template.network = None;
    template.extra_shares = shape
        .extra_shares
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let path = work.join(format!("share-{i}"));
            mkdirs(&path).map(|()| ExtraShare { tag: s.tag.clone(), path, read_only: s.read_only })
        })
        .collect::<Result<_, _>>()?;
    let result = run_template(cfg, &template, inputs.nics, &work, &snap, key).await;
    let out = match result {
        Ok(()) => {
            let meta = Meta {
                key: key.to_string(),
                inputs,
                created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                prepare_ms: started.elapsed().as_millis() as u64,
            };
            let json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
            std::fs::write(snap.join("meta.json"), json).map_err(io("writing the snapshot's meta.json"))?;
            let dest = root.join(key);
            std::fs::rename(&snap, &dest)
                .map_err(io(format!("moving the snapshot to {}", dest.display())))?;
            tracing::info!("snapshot {key} made in {:?}", started.elapsed());
            for old in superseded(root, &meta) {
                tracing::info!("snapshot {} superseded by {key}: removed", old.display());
                discard(&old);
            }
            Ok(dest)
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&work);
    out
}

async fn run_template(
    cfg: &Config,
    shape: &VmShape,
    nics: usize,
    work: &Path,
    snap: &Path,
    key: &str,
) -> Result<(), SnapshotError> {
    let vsock = work.join("vsock.sock");
    let control = work.join("control.sock");
    // One directory fd serves both sockets when the work directory's path is long.
    let (dir_fd, vsock_arg, control_arg) = if uds::fits(&vsock) && uds::fits(&control) {
        (None, vsock.clone(), control.clone())
    } else {
        let fd = uds::open_dir(work).map_err(io(format!("opening {}", work.display())))?;
        let at = |n: &str| uds::via_fd(WORK_DIR_FD, OsStr::new(n));
        (Some(fd), at("vsock.sock"), at("control.sock"))
    };
    let mut vm =
        super::husk_vmm::vm_config(cfg, work, shape, &vsock_arg, super::husk_vmm::Nics::Template(nics));
    // The template runs only what husk shipped, briefly, in a directory of its own.
    vm.jail = None;
    let config_path = work.join("vm.json");
    let json =
        serde_json::to_vec_pretty(&vm).map_err(|e| SnapshotError::Template(format!("encoding: {e}")))?;
    std::fs::write(&config_path, json).map_err(io(format!("writing {}", config_path.display())))?;
    let log_path = work.join("vmm.log");
    let log = File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(io("dup the template's log"))?;
    let args = vec![
        OsStr::new("--config"),
        config_path.as_os_str(),
        OsStr::new("--control"),
        control_arg.as_os_str(),
        OsStr::new("--snapshot-dir"),
        snap.as_os_str(),
        OsStr::new("--image-id"),
        OsStr::new(key),
    ];
    let pid = spawn(Spawn {
        program: &cfg.vmm,
        args,
        stdout: OwnedFd::from(log),
        stderr: OwnedFd::from(log2),
        netns: None,
        fd3: dir_fd,
        fd4: None,
        cgroup: None,
        new_pid_ns: false,
        // A template outlives no one: if husk dies while making it, it goes too.
        die_with_parent: true,
    })
    .map_err(io(format!("starting {}", cfg.vmm.display())))?;
    let start = crate::procinfo::start_time(pid).unwrap_or(0);
    let mut process = VmProcess::new(pid);
    let saved = save_when_ready(cfg, &mut process, (pid, start), &vsock, &control).await;
    if saved.is_err() {
        process.kill();
    }
    let exit = process.reap().await;
    let tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    };
    match (saved, exit) {
        // The files are complete and synced before the VMM answers `ok`. A caller that reaps
        // every child (a shim) leaves no exit status to see.
        (Ok(()), Some(VmExit::Code(0)) | None) => Ok(()),
        (Ok(()), Some(e)) => {
            Err(SnapshotError::Template(format!("husk-vmm ended with {e:?} after saving: {}", tail())))
        }
        (Err(SnapshotError::Template(m)), _) => Err(SnapshotError::Template(format!("{m}; log: {}", tail()))),
        (Err(e), _) => Err(e),
    }
}

async fn save_when_ready(
    cfg: &Config,
    process: &mut VmProcess,
    (pid, start): (i32, u64),
    vsock: &Path,
    control: &Path,
) -> Result<(), SnapshotError> {
    // A health check: the template's agent is the one every VM restored from it trusts.
    let connect =
        GrpcAgent::connect_when_ready(vsock, cfg.boot_timeout, Some(super::husk_vmm::RPC_TIMEOUT), None);
    tokio::pin!(connect);
    let agent = loop {
        tokio::select! {
            c = &mut connect => break c.map_err(|e| SnapshotError::Agent(e.to_string()))?,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                // Liveness first, so a VMM that dies in between is a zombie for try_wait.
                let gone = !crate::procinfo::alive(pid, start);
                let exit = process.try_wait();
                if exit.is_some() || gone {
                    return Err(SnapshotError::Template(format!("husk-vmm ended ({exit:?}) before its agent answered")));
                }
            }
        }
    };
    // Only a lost speed-up for restored VMs if the guest cannot (an agent without the call,
    // a kernel without 2 MiB pages).
    match agent.prepare_snapshot().await {
        Ok(r) => tracing::debug!(
            "template guest: {} 2 MiB chunks of the agent binary joined, {} not",
            r.joined_chunks,
            r.failed_chunks
        ),
        Err(e) => tracing::warn!("template guest not prepared for the snapshot: {e}"),
    }
    // The connection's close travels to the guest; until it has, the VMM refuses to save.
    drop(agent);
    let control = control.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        loop {
            match command(&control, "snapshot") {
                Ok(a) if a == "ok" => return Ok(()),
                Ok(a) if a.contains("vsock") && start.elapsed() < STREAM_DRAIN => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(a) => return Err(SnapshotError::Template(format!("snapshot refused: {a}"))),
                Err(e) => return Err(io("the template's control socket")(e)),
            }
        }
    })
    .await
    .map_err(|e| SnapshotError::Template(format!("control task: {e}")))?
}

/// Whether the snapshot in `dir` lacks a working set that parses: its next restored VM then
/// records one.
pub fn needs_working_set(dir: &Path) -> bool {
    !matches!(husk_vmm::snapshot::working_set::WorkingSet::load(&dir.join(WORKING_SET_FILE)), Ok(Some(_)))
}

/// Asks a restored VM to record its snapshot's working set (see [`WORKING_SET_FILE`]) and,
/// once the file it wrote in its own directory parses, puts it into the snapshot; the VM's
/// answer. Once per snapshot, so its cost (reading the VMM's page table) is paid once.
pub async fn record_working_set(r: &crate::state::WorkingSetRecording) -> Result<String, SnapshotError> {
    let r = r.clone();
    tokio::task::spawn_blocking(move || {
        let answer = command_within(&r.control, "working-set", WORKING_SET_WAIT)
            .map_err(io("the VM's control socket"))?;
        if !answer.starts_with("ok") {
            return Ok(answer);
        }
        let written = r.control.with_file_name(WORKING_SET_FILE);
        // What a VMM wrote is checked like any input: the format and its bounds.
        let ws = husk_vmm::snapshot::working_set::WorkingSet::load(&written)
            .map_err(|e| SnapshotError::WorkingSet(format!("the VM's file: {e}")))?
            .ok_or_else(|| SnapshotError::WorkingSet("the VM wrote none".into()))?;
        let _ = std::fs::remove_file(&written);
        let tmp = r.snapshot.join(format!("{WORKING_SET_FILE}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, ws.encode()).map_err(io(format!("writing {}", tmp.display())))?;
        // Atomic: a restore reads the old file whole, or the new one.
        std::fs::rename(&tmp, r.snapshot.join(WORKING_SET_FILE)).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io("placing the working set")(e)
        })?;
        // Once per snapshot: the chunks guests only read become 2 MiB pages every later
        // restore maps whole (tmpfs only; elsewhere a no-op). Only a lost speed-up if not.
        match husk_vmm::snapshot::huge_pages::join_read_only(&r.snapshot, &ws) {
            Ok(j) if j.unsupported => {
                tracing::debug!("snapshot memory kept in 4 KiB pages: its filesystem has no 2 MiB pages")
            }
            Ok(j) => tracing::debug!(
                "snapshot memory: {} read-only 2 MiB chunks joined, {} not",
                j.chunks,
                j.failed
            ),
            Err(e) => tracing::warn!("snapshot memory left in 4 KiB pages: {e}"),
        }
        Ok(answer)
    })
    .await
    .map_err(|e| SnapshotError::WorkingSet(format!("control task: {e}")))?
}

/// One command on a husk-vmm control socket; its one-line answer.
fn command(socket: &Path, cmd: &str) -> std::io::Result<String> {
    command_within(socket, cmd, SNAPSHOT_WAIT)
}

fn command_within(socket: &Path, cmd: &str, wait: Duration) -> std::io::Result<String> {
    let mut s = uds::connect_std(socket)?;
    s.set_read_timeout(Some(wait))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s.take(4096)).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> KeyInputs {
        KeyInputs {
            format: CACHE_FORMAT,
            vmm_sha256: "a".repeat(64),
            kernel_sha256: "b".repeat(64),
            initramfs_sha256: "c".repeat(64),
            cmdline: "console=ttyS0".into(),
            memory_mib: 256,
            vcpus: 1,
            shares: vec![],
            nics: 0,
            host_kernel: "6.1".into(),
            host_cpu: "x".into(),
        }
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = inputs();
        let k = base.key();
        assert_eq!(k.len(), 32);
        assert_eq!(k, inputs().key(), "the key is stable");
        type Change = fn(&mut KeyInputs);
        let changes: [Change; 10] = [
            |i| i.kernel_sha256 = "d".repeat(64),
            |i| i.initramfs_sha256 = "d".repeat(64),
            |i| i.vmm_sha256 = "d".repeat(64),
            |i| i.cmdline.push_str(" quiet"),
            |i| i.memory_mib = 512,
            |i| i.vcpus = 2,
            |i| i.shares.push(("vol".into(), true)),
            |i| i.nics = 1,
            |i| i.host_kernel = "6.2".into(),
            |i| i.host_cpu = "y".into(),
        ];
        for c in changes {
            let mut i = inputs();
            c(&mut i);
            assert_ne!(i.key(), k, "{i:?}");
        }
    }

    #[test]
    fn digests_follow_the_file_and_are_remembered() {
        let root = std::env::temp_dir().join(format!("husk-snapcache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("mkdir");
        let f = root.join("kernel");
        std::fs::write(&f, b"one").expect("write");
        let c = DigestCache::new(&root);
        let d1 = c.sha256(&f).expect("digest");
        assert_eq!(d1, hex(&Sha256::digest(b"one")));
        assert_eq!(c.sha256(&f).expect("cached"), d1);
        // Another content (and so another size and mtime) is hashed again.
        std::fs::write(&f, b"second").expect("write");
        assert_eq!(c.sha256(&f).expect("digest"), hex(&Sha256::digest(b"second")));
        // A damaged cache entry is not believed.
        for e in std::fs::read_dir(root.join("digests")).expect("dir").flatten() {
            std::fs::write(e.path(), "garbage").expect("write");
        }
        assert_eq!(c.sha256(&f).expect("digest"), hex(&Sha256::digest(b"second")));
        assert!(c.sha256(&root.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_new_entry_supersedes_only_its_own_use_from_older_inputs() {
        let root = std::env::temp_dir().join(format!("husk-snapsup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let entry = |i: KeyInputs| {
            let meta = Meta { key: i.key(), inputs: i, created: 1, prepare_ms: 1 };
            let dir = root.join(&meta.key);
            std::fs::create_dir_all(&dir).expect("mkdir");
            for f in ["state", "memory"] {
                std::fs::write(dir.join(f), b"x").expect("write");
            }
            std::fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).expect("json")).expect("write");
            meta
        };
        let mut old_kernel = inputs();
        old_kernel.kernel_sha256 = "0".repeat(64);
        let old = entry(old_kernel);
        let mut other_size = inputs();
        other_size.memory_mib = 512;
        let other = entry(other_size);
        let mut other_cmdline = inputs();
        other_cmdline.cmdline.push_str(" husk.fault=x");
        let faults = entry(other_cmdline);
        let new = entry(inputs());
        assert_eq!(superseded(&root, &new), vec![root.join(&old.key)]);
        // Another size and another command line are other uses: nothing of theirs goes.
        assert!(superseded(&root, &other).is_empty());
        assert!(superseded(&root, &faults).is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn only_complete_entries_are_found_and_listed() {
        let root = std::env::temp_dir().join(format!("husk-snaplist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let key = inputs().key();
        let dir = root.join(&key);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::create_dir_all(root.join(format!("{key}.tmp-1"))).expect("mkdir");
        std::fs::write(dir.join("state"), b"s").expect("write");
        assert!(lookup(&root, &key).is_none(), "no memory file yet");
        std::fs::write(dir.join("memory"), b"m").expect("write");
        let meta = Meta { key: key.clone(), inputs: inputs(), created: 1, prepare_ms: 2 };
        std::fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).expect("json")).expect("write");
        assert_eq!(lookup(&root, &key), Some(dir.clone()));
        let l = list(&root);
        assert_eq!(l.len(), 1, "the work directory is not an entry");
        assert_eq!(l[0].1.as_ref().map(|m| m.inputs.clone()), Some(inputs()));
        discard(&dir);
        assert!(lookup(&root, &key).is_none());
        // Removing everything leaves only the digest cache and the locks.
        for d in
            [dir.clone(), root.join("digests"), root.join("locks"), root.join(format!("{key}.discarded-9"))]
        {
            std::fs::create_dir_all(&d).expect("mkdir");
        }
        for f in ["state", "memory", "meta.json"] {
            std::fs::write(dir.join(f), b"x").expect("write");
        }
        assert_eq!(remove_all(&root), 1);
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["digests", "locks"]);
        let _ = std::fs::remove_dir_all(&root);
    }
}
