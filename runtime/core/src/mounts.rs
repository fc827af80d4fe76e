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
    if read_only {
        // Read-only before it is attached: the copies that propagate into the VMM's mount
        // namespace are made at attach time with the flags the mount has then, and a later
        // remount would leave them writable.
        return bind_read_only(source, target, recursive).map_err(RuntimeError::io(format!(
            "bind-mounting {} read-only on {}",
            source.display(),
            target.display()
        )));
    }
    let flags = if recursive { MsFlags::MS_BIND | MsFlags::MS_REC } else { MsFlags::MS_BIND };
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(RuntimeError::errno(format!(
        "bind-mounting {} on {}",
        source.display(),
        target.display()
    )))?;
    // Our bookkeeping mounts must not propagate into other mount namespaces.
    let _ = mount(None::<&str>, target, None::<&str>, MsFlags::MS_PRIVATE | MsFlags::MS_REC, None::<&str>);
    Ok(())
}

/// `struct mount_attr` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached copy of `source` (open_tree), made read-only (and private) while detached
/// (mount_setattr), then attached on `target` (move_mount).
fn bind_read_only(source: &Path, target: &Path, recursive: bool) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    const OPEN_TREE_CLONE: libc::c_ulong = 1;
    const AT_RECURSIVE: libc::c_ulong = 0x8000;
    const MOUNT_ATTR_RDONLY: u64 = 1;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_ulong = 4;
    let cstr = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (src, dst) = (cstr(source)?, cstr(target)?);
    let rec = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: open_tree with a valid C string; the result is a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_ulong | rec,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a fresh descriptor nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr =
        MountAttr { attr_set: MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: libc::MS_PRIVATE, userns_fd: 0 };
    // SAFETY: mount_setattr reads `attr` (its size given) and changes only the detached tree.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_ulong | rec,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: move_mount of our detached tree onto a valid C string path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // As for the writable binds: later events under it stay here.
    let _ = mount(None::<&str>, target, None::<&str>, MsFlags::MS_PRIVATE | MsFlags::MS_REC, None::<&str>);
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
