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

/// Whether a container's rootfs gets a tmpfs-backed overlay. Container setup creates mount
/// points (`/proc`, `/dev`, `/etc/hosts`, bind targets) in the rootfs before it is made
/// read-only, as runc does; a rootfs the spec wants read-only (CRI's pause image, a
/// `readonlyRootfs` container) or one on a read-only share must get them without a write to
/// the caller's files, so they go to the overlay's upper layer. A writable rootfs is used as is.
pub fn needs_overlay(spec_read_only: bool, lower_read_only: bool) -> bool {
    spec_read_only || lower_read_only
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
    fn read_only_roots_never_take_writes() {
        assert!(needs_overlay(true, false), "readonly spec over a writable share");
        assert!(needs_overlay(true, true));
        assert!(needs_overlay(false, true), "writable spec over a read-only share");
        assert!(!needs_overlay(false, false));
    }

    /// A `FROM scratch` rootfs with only `/pause`, read-only underneath: the overlay takes the
    /// mount points and the lower directory is never written.
    #[test]
    fn mount_points_land_in_the_overlay() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting an overlay needs root");
            return;
        }
        let base = std::env::temp_dir().join(format!("husk-agent-ovl-{}", std::process::id()));
        let lower = base.join("lower");
        std::fs::create_dir_all(&lower).expect("mkdir");
        std::fs::write(lower.join("pause"), b"x").expect("write");
        let merged = match mount_overlay(&lower, &base.join("ovl")) {
            Ok(m) => m,
            Err(e) if std::env::var_os("HUSK_TESTS_STRICT").is_none() => {
                eprintln!("skipped: no overlayfs here: {e}");
                let _ = std::fs::remove_dir_all(&base);
                return;
            }
            Err(e) => panic!("overlay: {e}"),
        };
        for d in ["proc", "dev", "sys", "etc"] {
            std::fs::create_dir_all(merged.join(d)).expect("mount point in the overlay");
        }
        std::fs::write(merged.join("etc/hosts"), b"").expect("file mount point");
        assert!(merged.join("pause").is_file());
        let names: Vec<_> =
            std::fs::read_dir(&lower).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("pause")], "the lower rootfs was written");
        remove_overlay(&base.join("ovl"));
        let _ = std::fs::remove_dir_all(&base);
    }

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
