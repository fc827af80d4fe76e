//! Network namespaces husk owns (for `husk run`'s CNI networks): a namespace kept alive by a
//! bind mount on a file, as `ip netns add` does, so it outlives the process that made it and
//! CNI plugins and husk-vmm can enter it by path.

use std::io::ErrorKind;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::error::RuntimeError;

/// Whether `path` is a (mounted) namespace file.
pub fn is_netns(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Makes a new network namespace and pins it at `path` (the parent directory is made if
/// needed). Idempotent: a namespace already there is kept.
pub fn create(path: &Path) -> Result<(), RuntimeError> {
    if is_netns(path) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(RuntimeError::io(format!("creating {}", dir.display())))?;
    }
    match std::fs::File::options().write(true).create_new(true).open(path) {
        Ok(_) => {}
        // An empty file left by an earlier attempt is reused.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(RuntimeError::io(format!("creating {}", path.display()))(e)),
    }
    let target = path.to_path_buf();
    // unshare(CLONE_NEWNET) moves only the calling thread: a thread of its own, which ends
    // right after, so no other work of this process runs in the new namespace.
    let made = std::thread::Builder::new()
        .name("husk-netns-new".into())
        .spawn(move || -> Result<(), RuntimeError> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(RuntimeError::errno("unshare(CLONE_NEWNET)"))?;
            mount(Some("/proc/thread-self/ns/net"), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(RuntimeError::errno(format!(
                    "bind-mounting a new network namespace on {}",
                    target.display()
                )))
        })
        .map_err(RuntimeError::io("starting the netns thread"))?
        .join()
        .map_err(|_| RuntimeError::Internal("the netns thread panicked".into()))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    tracing::debug!("network namespace {} created", path.display());
    Ok(())
}

/// Unpins and removes the namespace file at `path` (the namespace goes once nothing else holds
/// it). Idempotent: a missing file or one that is no mount point is fine.
pub fn remove(path: &Path) -> Result<(), RuntimeError> {
    // A file mounted over more than once (never by husk, but cheap to handle) needs one
    // unmount per layer.
    for _ in 0..8 {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(Errno::EINVAL) | Err(Errno::ENOENT) => break,
            Err(e) => return Err(RuntimeError::errno(format!("unmounting {}", path.display()))(e)),
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::io(format!("removing {}", path.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_is_idempotent_and_files_are_not_namespaces() {
        let dir = std::env::temp_dir().join(format!("husk-netns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let p = dir.join("plain");
        std::fs::write(&p, b"").expect("write");
        assert!(!is_netns(&p));
        assert!(!is_netns(&dir.join("missing")));
        assert!(is_netns(Path::new("/proc/self/ns/net")));
        remove(&p).expect("remove a plain file");
        assert!(!p.exists());
        remove(&p).expect("remove again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Needs CAP_SYS_ADMIN; skipped (with a note) without it.
    #[test]
    fn create_pins_a_new_namespace_and_remove_unpins_it() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: creating a network namespace needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("husk-netns-root-{}", std::process::id()));
        let p = dir.join("ns1");
        create(&p).expect("create");
        assert!(is_netns(&p));
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("stat"));
        assert_ne!(ino(&p), ino(Path::new("/proc/self/ns/net")), "a new namespace, not ours");
        create(&p).expect("create again keeps it");
        assert!(is_netns(&p));
        remove(&p).expect("remove");
        assert!(!p.exists());
        remove(&p).expect("remove again");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
