//! Container root file systems: a directory inside a share, checked to stay inside it, and the
//! overlay that makes a read-only share writable for one container.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::AgentError;

/// `share_root/rel`, which must be a directory that (after resolving symlinks) is still inside
/// `share_root`.
pub fn resolve(share_root: &Path, rel: &str) -> Result<PathBuf, AgentError> {
    let root =
        share_root.canonicalize().map_err(AgentError::io(format!("share {}", share_root.display())))?;
    let dir = root
        .join(rel)
        .canonicalize()
        .map_err(|e| AgentError::InvalidArgument(format!("rootfs {rel:?}: {e}")))?;
    if !dir.starts_with(&root) {
        return Err(AgentError::InvalidArgument(format!("rootfs {rel:?} resolves outside its share")));
    }
    if !dir.is_dir() {
        return Err(AgentError::InvalidArgument(format!("rootfs {rel:?} is not a directory")));
    }
    Ok(dir)
}

pub fn is_read_only(dir: &Path) -> bool {
    nix::sys::statvfs::statvfs(dir).is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

/// Mounts `lower` + a fresh upper layer under `dir`; returns the merged directory.
pub fn mount_overlay(lower: &Path, dir: &Path) -> Result<PathBuf, AgentError> {
    let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).map_err(AgentError::io(format!("mkdir {}", d.display())))?;
    }
    // Overlay options are comma-separated; a path with a comma or colon would be misparsed.
    for p in [lower, &upper, &work] {
        let s = p.to_string_lossy();
        if s.contains([',', ':']) {
            return Err(AgentError::InvalidArgument(format!("overlay path {s:?} contains ',' or ':'")));
        }
    }
    let data =
        format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
    mount(Some("overlay"), &merged, Some("overlay"), MsFlags::empty(), Some(data.as_str()))
        .map_err(AgentError::errno("mounting the rootfs overlay"))?;
    Ok(merged)
}

pub fn remove_overlay(dir: &Path) {
    let merged = dir.join("rootfs");
    if let Err(e) = umount2(&merged, MntFlags::MNT_DETACH) {
        if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
            tracing::warn!("unmounting {}: {e}", merged.display());
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_stays_inside_the_share() {
        let base = std::env::temp_dir().join(format!("husk-agent-rootfs-{}", std::process::id()));
        let share = base.join("share");
        std::fs::create_dir_all(share.join("rootfs")).expect("mkdir");
        std::fs::write(share.join("file"), b"x").expect("write");
        let _ = std::os::unix::fs::symlink("/etc", share.join("escape"));
        assert!(resolve(&share, "rootfs").is_ok());
        assert!(resolve(&share, "").is_ok());
        let e = resolve(&share, "escape").expect_err("escape refused").to_string();
        assert!(e.contains("outside"), "{e}");
        assert!(resolve(&share, "file").is_err());
        assert!(resolve(&share, "missing").is_err());
        let _ = std::fs::remove_dir_all(&base);
    }
}
