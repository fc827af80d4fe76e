//! Host bind mounts that put container rootfs and bind-mount sources under a sandbox's share,
//! and their removal.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::RuntimeError;

/// Bind-mounts `source` on `target` (created as an empty directory or file to match),
/// read-only on the host too when asked, so a compromised guest cannot write through.
pub fn bind(source: &Path, target: &Path, recursive: bool, read_only: bool) -> Result<(), RuntimeError> {
    let meta = std::fs::metadata(source)
        .map_err(|e| RuntimeError::Bundle(format!("bind mount source {}: {e}", source.display())))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(RuntimeError::io(format!("creating {}", parent.display())))?;
    }
    if meta.is_dir() { std::fs::create_dir_all(target) } else { std::fs::File::create(target).map(drop) }
        .map_err(RuntimeError::io(format!("creating mount point {}", target.display())))?;
    let flags = if recursive { MsFlags::MS_BIND | MsFlags::MS_REC } else { MsFlags::MS_BIND };
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(RuntimeError::errno(format!(
        "bind-mounting {} on {}",
        source.display(),
        target.display()
    )))?;
    // Our bookkeeping mounts must not propagate into other mount namespaces.
    let _ = mount(None::<&str>, target, None::<&str>, MsFlags::MS_PRIVATE | MsFlags::MS_REC, None::<&str>);
    if read_only {
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            return Err(RuntimeError::errno(format!("remounting {} read-only", target.display()))(e));
        }
    }
    Ok(())
}

/// Unmounts `targets` in reverse order (lazily: a busy mount must not block a delete).
pub fn unmount_all(targets: &[PathBuf]) {
    for t in targets.iter().rev() {
        match umount2(t.as_path(), MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => tracing::warn!("unmounting {}: {e}", t.display()),
        }
    }
}

/// The first mount point at or below `dir` in this mount namespace.
pub fn first_mount_under(dir: &Path) -> Result<Option<PathBuf>, RuntimeError> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(RuntimeError::io("reading mountinfo"))?;
    Ok(mount_points(&info).into_iter().find(|m| m.starts_with(dir)))
}

/// Unmounts everything at or below `dir` (cleanup after a crash lost the records).
pub fn unmount_under(dir: &Path) -> Result<(), RuntimeError> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(RuntimeError::io("reading mountinfo"))?;
    let mut points: Vec<PathBuf> = mount_points(&info).into_iter().filter(|m| m.starts_with(dir)).collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        umount2(&p, MntFlags::MNT_DETACH)
            .map_err(RuntimeError::errno(format!("unmounting {}", p.display())))?;
    }
    Ok(())
}

/// Mount points (field 5) from mountinfo text, with its octal escapes undone.
fn mount_points(info: &str) -> Vec<PathBuf> {
    info.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(unescape(p))).collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let info = "22 1 0:21 / /run rw,nosuid - tmpfs tmpfs rw\n\
                    30 22 0:22 / /run/husk/a\\040b rw - tmpfs x rw\n";
        assert_eq!(mount_points(info), vec![PathBuf::from("/run"), PathBuf::from("/run/husk/a b")]);
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("tail\\04"), "tail\\04");
    }

    #[test]
    fn nothing_mounted_under_a_fresh_dir() {
        let d = std::env::temp_dir().join(format!("husk-mounts-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        assert_eq!(first_mount_under(&d).expect("mountinfo"), None);
        let _ = std::fs::remove_dir_all(&d);
    }
}
