//! The state directory (`--root`, default `/run/husk`): one directory per container and per
//! sandbox, each with a JSON record and a lock file. Records are written atomically (write to a
//! temporary file, rename), so a reader never sees half a record and a crash loses nothing that
//! was already recorded.
//!
//! ```text
//! <root>/containers/<id>/{lock,state.json}
//! <root>/sandboxes/<sid>/{lock,sandbox.json,cni.json,vsock.sock,console.log,vmm.log,shared/}
//! <root>/netns/<sid>     a network namespace husk made for the sandbox (see `cni::sandbox`)
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;

/// Default `--root`, as runc's `/run/runc`.
pub const DEFAULT_ROOT: &str = "/run/husk";

/// Container ids and sandbox ids: what the agent accepts (they name files in both places).
pub fn check_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::InvalidId(id.to_string()))
    }
}

/// What husk remembers about a container between CLI calls.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    /// Absolute bundle directory and rootfs (as `state` reports them).
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339 creation time.
    pub created: String,
    pub annotations: BTreeMap<String, String>,
    /// The host process behind `--pid-file` (see `relay`), and its start time, so a reused PID
    /// is not mistaken for it.
    pub relay_pid: i32,
    pub relay_start: u64,
    /// The init process's PID inside the guest.
    pub guest_pid: u32,
    /// The PID clients know the container by, when not `relay_pid` (a shim reports guest
    /// PIDs); pod peers name namespaces by it.
    #[serde(default)]
    pub client_pid: Option<i32>,
    /// Host mounts made for this container under the sandbox's share, innermost last.
    pub host_mounts: Vec<PathBuf>,
    /// Hooks still to run on the host: the bundle may be gone when they are due.
    #[serde(default)]
    pub poststart: Vec<oci_spec::runtime::Hook>,
    #[serde(default)]
    pub poststop: Vec<oci_spec::runtime::Hook>,
    /// Its init is PID 1 of a PID namespace of its own, so nothing of the container outlives
    /// it (false in records written before this was kept: the guest is asked to clean up).
    #[serde(default)]
    pub own_pid_namespace: bool,
}

/// One VM and the containers in it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxRecord {
    pub id: String,
    pub vmm_pid: i32,
    pub vmm_start: u64,
    pub vsock: PathBuf,
    pub containers: Vec<String>,
    /// The VM's size, what later containers of the pod must fit in (0: not recorded).
    #[serde(default)]
    pub memory_mib: u32,
    #[serde(default)]
    pub vcpus: u32,
    /// The pod namespace's taps and redirects, undone when the VM goes.
    #[serde(default)]
    pub network: Option<crate::network::Wired>,
    /// When this VM (restored from a snapshot that has no working set yet) records one once
    /// its first container is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_set: Option<WorkingSetRecording>,
}

/// Where a restored VM records its snapshot's working set: it writes the file beside its
/// control socket, in its own directory (a jailed VMM never writes to the shared snapshot),
/// and husk checks it and puts it into the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkingSetRecording {
    pub control: PathBuf,
    pub snapshot: PathBuf,
}

/// An exclusive lock on a container or sandbox, held until dropped.
#[derive(Debug)]
pub struct Lock {
    _flock: Flock<File>,
}

impl Lock {
    fn take(path: &Path) -> Result<Self, RuntimeError> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(RuntimeError::io(format!("opening lock {}", path.display())))?;
        let flock = Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| RuntimeError::Io {
            what: format!("locking {}", path.display()),
            source: e.into(),
        })?;
        Ok(Self { _flock: flock })
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, RuntimeError> {
        let root = root.into();
        for d in ["containers", "sandboxes"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(RuntimeError::io(format!("creating {}", p.display())))?;
        }
        Ok(Self { root })
    }

    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.root.join("containers").join(id)
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.root.join("sandboxes").join(id)
    }

    /// A `husk run`'s own files (its bundle, an unpacked image), which go with its sandbox.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.root.join("runs").join(id)
    }

    /// Makes a new container's directory and locks it; fails if the id is taken.
    pub fn reserve_container(&self, id: &str) -> Result<Lock, RuntimeError> {
        check_id(id)?;
        let dir = self.container_dir(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => Lock::take(&dir.join("lock")),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(RuntimeError::Exists(id.to_string())),
            Err(e) => Err(RuntimeError::Io { what: format!("creating {}", dir.display()), source: e }),
        }
    }

    /// Locks an existing container and reads its record.
    pub fn lock_container(&self, id: &str) -> Result<(Lock, ContainerRecord), RuntimeError> {
        check_id(id)?;
        let dir = self.container_dir(id);
        if !dir.is_dir() {
            return Err(RuntimeError::NotFound(id.to_string()));
        }
        let lock = Lock::take(&dir.join("lock"))?;
        // Deleted (or never finished) while we waited for the lock.
        let rec =
            read_json(&dir.join("state.json"))?.ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        Ok((lock, rec))
    }

    /// Reads a container record without locking (for `list` and `state`).
    pub fn read_container(&self, id: &str) -> Result<ContainerRecord, RuntimeError> {
        check_id(id)?;
        read_json(&self.container_dir(id).join("state.json"))?
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))
    }

    /// Removes a container directory that was reserved but never recorded (its create was
    /// killed first). A create still under way holds the lock: it is waited for, and what it
    /// recorded kept.
    pub fn remove_unrecorded_container(&self, id: &str) -> Result<(), RuntimeError> {
        check_id(id)?;
        let dir = self.container_dir(id);
        if !dir.is_dir() {
            return Ok(());
        }
        let _lock = match Lock::take(&dir.join("lock")) {
            Ok(l) => l,
            // Removed meanwhile (a failed create cleans up after itself).
            Err(RuntimeError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if dir.join("state.json").exists() {
            return Ok(());
        }
        self.remove_container(id)
    }

    pub fn write_container(&self, rec: &ContainerRecord) -> Result<(), RuntimeError> {
        write_json(&self.container_dir(&rec.id).join("state.json"), rec)
    }

    pub fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let dir = self.container_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::Io { what: format!("removing {}", dir.display()), source: e }),
        }
    }

    /// Every container id with a record, sorted.
    pub fn container_ids(&self) -> Result<Vec<String>, RuntimeError> {
        let dir = self.root.join("containers");
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .map_err(RuntimeError::io(format!("reading {}", dir.display())))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| self.container_dir(id).join("state.json").is_file())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Locks a sandbox directory, creating it if needed; returns its record if it has one.
    pub fn lock_sandbox(&self, id: &str) -> Result<(Lock, Option<SandboxRecord>), RuntimeError> {
        check_id(id)?;
        let dir = self.sandbox_dir(id);
        std::fs::create_dir_all(&dir).map_err(RuntimeError::io(format!("creating {}", dir.display())))?;
        let lock = Lock::take(&dir.join("lock"))?;
        let rec = read_json(&dir.join("sandbox.json"))?;
        Ok((lock, rec))
    }

    /// Whether a call holds sandbox `sid`'s lock right now (a create under way).
    pub fn sandbox_busy(&self, sid: &str) -> bool {
        let Ok(f) = File::options().write(true).open(self.sandbox_dir(sid).join("lock")) else {
            return false;
        };
        Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err()
    }

    /// [`lock_container`](Self::lock_container) off the async runtime's threads (the lock
    /// may be held by another process for as long as its call takes).
    pub async fn lock_container_async(&self, id: &str) -> Result<(Lock, ContainerRecord), RuntimeError> {
        let (s, id) = (self.clone(), id.to_string());
        blocking(move || s.lock_container(&id)).await
    }

    /// [`reserve_container`](Self::reserve_container) off the async runtime's threads.
    pub async fn reserve_container_async(&self, id: &str) -> Result<Lock, RuntimeError> {
        let (s, id) = (self.clone(), id.to_string());
        blocking(move || s.reserve_container(&id)).await
    }

    /// [`remove_unrecorded_container`](Self::remove_unrecorded_container) off the async
    /// runtime's threads.
    pub async fn remove_unrecorded_container_async(&self, id: &str) -> Result<(), RuntimeError> {
        let (s, id) = (self.clone(), id.to_string());
        blocking(move || s.remove_unrecorded_container(&id)).await
    }

    /// [`lock_sandbox`](Self::lock_sandbox) off the async runtime's threads.
    pub async fn lock_sandbox_async(&self, id: &str) -> Result<(Lock, Option<SandboxRecord>), RuntimeError> {
        let (s, id) = (self.clone(), id.to_string());
        blocking(move || s.lock_sandbox(&id)).await
    }

    pub fn read_sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, RuntimeError> {
        read_json(&self.sandbox_dir(id).join("sandbox.json"))
    }

    pub fn write_sandbox(&self, rec: &SandboxRecord) -> Result<(), RuntimeError> {
        write_json(&self.sandbox_dir(&rec.id).join("sandbox.json"), rec)
    }

    /// Every sandbox directory's id, sorted (records or not: leftovers of a crash too).
    pub fn sandbox_ids(&self) -> Result<Vec<String>, RuntimeError> {
        let dir = self.root.join("sandboxes");
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .map_err(RuntimeError::io(format!("reading {}", dir.display())))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| check_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Where the network namespace husk makes for sandbox `sid` is pinned. Outside the
    /// sandbox directory, whose removal must never meet a mount.
    pub fn netns_path(&self, sid: &str) -> PathBuf {
        self.root.join("netns").join(sid)
    }

    /// The sandbox's CNI attachment record.
    pub fn cni_record_path(&self, sid: &str) -> PathBuf {
        self.sandbox_dir(sid).join("cni.json")
    }

    pub fn read_cni(&self, sid: &str) -> Result<Option<crate::cni::Attachment>, RuntimeError> {
        read_json(&self.cni_record_path(sid))
    }

    pub fn write_cni(&self, sid: &str, att: &crate::cni::Attachment) -> Result<(), RuntimeError> {
        write_json(&self.cni_record_path(sid), att)
    }

    pub fn remove_cni(&self, sid: &str) -> Result<(), RuntimeError> {
        let p = self.cni_record_path(sid);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::Io { what: format!("removing {}", p.display()), source: e }),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RuntimeError> + Send + 'static,
) -> Result<T, RuntimeError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| RuntimeError::Internal(format!("lock task: {e}")))?
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, RuntimeError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RuntimeError::Io { what: format!("reading {}", path.display()), source: e }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| RuntimeError::CorruptState(format!("{}: {e}", path.display())))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RuntimeError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| RuntimeError::Internal(e.to_string()))?;
    std::fs::write(&tmp, bytes).map_err(RuntimeError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(RuntimeError::io(format!("renaming {}", tmp.display())))
}

/// Writes `contents` to `path` atomically (pid files: a reader must never see an empty one).
pub fn write_atomic(path: &Path, contents: &str) -> Result<(), RuntimeError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).map_err(RuntimeError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(RuntimeError::io(format!("renaming {}", tmp.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn record(id: &str) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            sandbox_id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2026-01-01T00:00:00Z".into(),
            annotations: BTreeMap::new(),
            relay_pid: 1,
            relay_start: 2,
            guest_pid: 3,
            client_pid: None,
            host_mounts: vec![],
            poststart: vec![],
            poststop: vec![],
            own_pid_namespace: true,
        }
    }

    #[test]
    fn ids() {
        for good in ["a", "abc-DEF_1.2", &"x".repeat(64)] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reserve_write_read_remove() {
        let root = tmp("crud");
        let s = StateDir::new(&root).expect("state dir");
        let lock = s.reserve_container("c1").expect("reserve");
        assert!(matches!(s.reserve_container("c1"), Err(RuntimeError::Exists(_))));
        // Reserved but not yet recorded: not listed, not found.
        assert!(s.container_ids().expect("ids").is_empty());
        s.write_container(&record("c1")).expect("write");
        drop(lock);
        let (l, rec) = s.lock_container("c1").expect("lock");
        assert_eq!(rec, record("c1"));
        assert_eq!(s.container_ids().expect("ids"), vec!["c1".to_string()]);
        drop(l);
        // A recorded container is no leftover reservation.
        s.remove_unrecorded_container("c1").expect("kept");
        assert!(s.container_dir("c1").join("state.json").is_file());
        s.remove_container("c1").expect("remove");
        assert!(matches!(s.read_container("c1"), Err(RuntimeError::NotFound(_))));
        // A reservation whose create died (its lock released, nothing recorded) goes.
        drop(s.reserve_container("c2").expect("reserve"));
        s.remove_unrecorded_container("c2").expect("remove reservation");
        assert!(!s.container_dir("c2").exists());
        s.remove_unrecorded_container("c2").expect("nothing to remove");
        assert!(matches!(s.lock_container("../x"), Err(RuntimeError::InvalidId(_))));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn sandboxes_are_listed_with_or_without_records_and_their_cni_record_round_trips() {
        let root = tmp("sandboxes");
        let s = StateDir::new(&root).expect("state dir");
        let (lock, rec) = s.lock_sandbox("run-1").expect("lock");
        assert!(rec.is_none());
        assert!(s.sandbox_busy("run-1"));
        drop(lock);
        assert!(!s.sandbox_busy("run-1"));
        std::fs::create_dir_all(root.join("sandboxes/.hidden")).expect("mkdir");
        assert_eq!(s.sandbox_ids().expect("ids"), ["run-1"]);
        assert!(s.read_cni("run-1").expect("read").is_none());
        let att = crate::cni::Attachment {
            netns: s.netns_path("run-1"),
            conflist: serde_json::json!({"name": "n"}),
            container_id: "run-1".into(),
            ifname: "eth0".into(),
            port_mappings: vec!["80:8080".parse().expect("port")],
            bin_dirs: vec!["/usr/lib/cni".into()],
            result: None,
        };
        s.write_cni("run-1", &att).expect("write");
        assert_eq!(s.read_cni("run-1").expect("read"), Some(att));
        assert_eq!(s.netns_path("run-1"), root.join("netns/run-1"));
        s.remove_cni("run-1").expect("remove");
        s.remove_cni("run-1").expect("remove again");
        assert!(s.read_cni("run-1").expect("read").is_none());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn corrupt_record_is_an_error_not_a_panic() {
        let root = tmp("corrupt");
        let s = StateDir::new(&root).expect("state dir");
        let _l = s.reserve_container("c2").expect("reserve");
        std::fs::write(s.container_dir("c2").join("state.json"), b"{nope").expect("write");
        assert!(matches!(s.read_container("c2"), Err(RuntimeError::CorruptState(_))));
        let _ = std::fs::remove_dir_all(&root);
    }
}
