//! A cgroup v2 per sandbox VMM, `<cgroup2 root>/husk/<sandbox id>`: `memory.max` is the guest's
//! RAM plus the VMM's own allowance and `pids.max` bounds its threads, so a runaway VMM is
//! contained and what it uses shows in `memory.current` / `pids.current`.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The VMM's memory beyond guest RAM: binary, heaps, device buffers and the page cache its
/// share I/O brings in (reclaimable, so this bounds rather than reserves).
pub const VMM_OVERHEAD_MIB: u64 = 256;
/// Main, device workers, vCPUs (added), and two per forwarded loopback connection (64 at most).
pub const VMM_BASE_PIDS: u64 = 160;

const ROOT: &str = "/sys/fs/cgroup";
/// How long a new sandbox waits for a same-id predecessor's cgroup to be removed by the
/// process destroying its VM: longer than that process tries (about a second).
const HANDED_OVER_WAIT: Duration = Duration::from_millis(1500);
const PARENT: &str = "husk";
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The sandbox's VMM cgroup directory.
pub fn path(sid: &str) -> PathBuf {
    Path::new(ROOT).join(PARENT).join(sid)
}

fn is_cgroup2(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
}

/// Turns on the memory and pids controllers for `dir`'s children.
fn enable_controllers(dir: &Path) -> io::Result<()> {
    let have = std::fs::read_to_string(dir.join("cgroup.subtree_control"))?;
    let missing: Vec<&str> =
        ["memory", "pids"].into_iter().filter(|c| !have.split_whitespace().any(|h| h == *c)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let line: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
    std::fs::write(dir.join("cgroup.subtree_control"), line.join(" "))
}

/// Creates the cgroup with its limits and returns it opened (for CLONE_INTO_CGROUP).
pub fn create(sid: &str, guest_mib: u64, vcpus: u32) -> io::Result<OwnedFd> {
    let root = Path::new(ROOT);
    if !is_cgroup2(root) {
        return Err(io::Error::new(io::ErrorKind::Unsupported, format!("{ROOT} is not a cgroup v2 mount")));
    }
    if sid.is_empty() || sid.starts_with('.') || sid.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("sandbox id {sid:?}")));
    }
    enable_controllers(root)?;
    let parent = root.join(PARENT);
    match std::fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    enable_controllers(&parent)?;
    let dir = parent.join(sid);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // A sandbox of the same id that just ended: the process that destroys its VM
            // removes this directory once KVM's threads have left it (vm/release.rs), and
            // would remove ours if we took it over now. It gives up within a second.
            let deadline = std::time::Instant::now() + HANDED_OVER_WAIT;
            while dir.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            // Still there: left by a VMM that died with its husk (empty, or it would still
            // be running), taken over as it is.
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    }
    let mem = (guest_mib + VMM_OVERHEAD_MIB) << 20;
    std::fs::write(dir.join("memory.max"), mem.to_string())?;
    std::fs::write(dir.join("pids.max"), (VMM_BASE_PIDS + u64::from(vcpus)).to_string())?;
    Ok(std::fs::File::open(&dir)?.into())
}

/// Removes the cgroup once the VMM has left it (its exit takes a moment to be accounted).
pub fn remove(sid: &str) {
    let dir = path(sid);
    for _ in 0..50 {
        match std::fs::remove_dir(&dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                tracing::warn!("removing cgroup {}: {e}", dir.display());
                return;
            }
        }
    }
    tracing::warn!("cgroup {} still has processes; left in place", dir.display());
}
