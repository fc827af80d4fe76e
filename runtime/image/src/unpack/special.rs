//! Character and block devices and FIFOs, created only when running as root.
//!
//! The rootfs reaches the guest through virtio-fs, where a device node opens the guest's own device with
//! that major:minor (containerd creates them too). On the host they sit under the store's root-only
//! directory, so nobody else can open them there.

use std::fs;
use std::io;
use std::os::unix::fs::{lchown, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tracing::warn;

use super::{owner, Layer};
use crate::error::ImageError;

/// Creates the device node or FIFO `header` describes at `target` (which must not exist; its parents
/// are checked real directories), with the entry's owner, mode and mtime. Returns false if root may not
/// create devices here (a user namespace, no CAP_MKNOD): the guest mounts its own /dev, so that is a warning.
pub(super) fn make_node(
    layer: &Layer,
    name: &str,
    header: &tar::Header,
    target: &Path,
) -> Result<bool, ImageError> {
    let failed = |e: io::Error| layer.failed(name)(e);
    let (kind, dev) = match header.entry_type() {
        tar::EntryType::Char => (SFlag::S_IFCHR, device(layer, name, header)?),
        tar::EntryType::Block => (SFlag::S_IFBLK, device(layer, name, header)?),
        _ => (SFlag::S_IFIFO, 0),
    };
    let mode = header.mode().map_err(failed)? & 0o7777;
    let (uid, gid) = owner(header).map_err(failed)?;
    // Owner-only until the real mode is set: no moment where the node is open to everyone. mknod does not
    // follow a symlink in the last component (it fails with EEXIST).
    match mknod(target, kind, Mode::S_IRUSR | Mode::S_IWUSR, dev) {
        Ok(()) => {}
        Err(Errno::EPERM) if kind != SFlag::S_IFIFO => {
            warn!(layer = %layer.digest, entry = name, "not allowed to create device nodes; skipping");
            return Ok(false);
        }
        Err(e) => return Err(failed(e.into())),
    }
    // chown before chmod: chown clears setuid/setgid bits.
    lchown(target, Some(uid), Some(gid)).map_err(failed)?;
    fs::set_permissions(target, fs::Permissions::from_mode(mode)).map_err(failed)?;
    let secs = header.mtime().map_err(failed)?;
    let t = TimeSpec::new(i64::try_from(secs).unwrap_or(i64::MAX), 0);
    utimensat(None, target, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(|e| failed(e.into()))?;
    Ok(true)
}

fn device(layer: &Layer, name: &str, header: &tar::Header) -> Result<libc::dev_t, ImageError> {
    let failed = |e: io::Error| layer.failed(name)(e);
    let major = header.device_major().map_err(failed)?;
    let minor = header.device_minor().map_err(failed)?;
    match (major, minor) {
        (Some(major), Some(minor)) => Ok(makedev(major.into(), minor.into())),
        _ => Err(layer.refuse(name, "device node without device numbers")),
    }
}
