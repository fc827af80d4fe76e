//! Extended attributes from PAX `SCHILY.xattr.NAME` records (as docker, umoci and skopeo write them).
//!
//! - `security.capability` must be applied: it is what lets e.g. ping work without setuid.
//! - `user.*`, `trusted.*` and other `security.*` attributes are applied best-effort: a filesystem or
//!   kernel that refuses them (EPERM, EOPNOTSUPP) gets a warning.
//! - Skipped: `security.selinux` (the guest decides labels), overlayfs's own `trusted.overlay.*` and
//!   `user.overlay.*` (the guest overlays this rootfs; an image must not steer that), other namespaces,
//!   and on symlinks everything but `user.*` and `trusted.*`.
//!
//! Attributes are set after the entry's owner and mode, since chown clears `security.capability`, and
//! never through a symlink.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tracing::{debug, warn};
use xattr::FileExt as _;

use super::pax::Record;
use super::Layer;
use crate::error::ImageError;

const PAX_XATTR: &[u8] = b"SCHILY.xattr.";
const CAPABILITY: &[u8] = b"security.capability";
/// Per entry: more than this many attributes, or this many bytes of values, is not a real image.
const MAX_XATTRS: usize = 64;
const MAX_XATTR_BYTES: usize = 64 << 10;

pub(super) struct Xattr {
    name: Vec<u8>,
    value: Vec<u8>,
}

/// Picks the extended attributes out of an entry's PAX records.
pub(super) fn read(layer: &Layer, name: &str, records: &[Record]) -> Result<Vec<Xattr>, ImageError> {
    let mut xattrs = Vec::new();
    let mut total = 0;
    for record in records {
        let Some(attr) = record.key.strip_prefix(PAX_XATTR) else { continue };
        total += record.value.len();
        if xattrs.len() == MAX_XATTRS || total > MAX_XATTR_BYTES {
            return Err(layer.refuse(name, "more than 64 extended attributes or 64 KiB of their values"));
        }
        if attr.is_empty() || attr.contains(&0) {
            return Err(layer.refuse(name, "invalid extended attribute name"));
        }
        xattrs.push(Xattr { name: attr.to_vec(), value: record.value.clone() });
    }
    Ok(xattrs)
}

/// Where to set the attributes: the file just written, or a path that is never followed if a symlink.
#[derive(Clone, Copy)]
pub(super) enum Target<'a> {
    File(&'a File),
    Path(&'a Path),
}

enum Policy {
    Required,
    BestEffort,
    Skip(&'static str),
}

fn policy(name: &[u8], symlink: bool) -> Policy {
    if name == b"security.selinux" {
        return Policy::Skip("the guest labels files itself");
    }
    if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
        return Policy::Skip("overlayfs-private attribute");
    }
    let user_or_trusted = name.starts_with(b"user.") || name.starts_with(b"trusted.");
    if symlink && !user_or_trusted {
        return Policy::Skip("only user.* and trusted.* apply to symlinks");
    }
    if name == CAPABILITY {
        Policy::Required
    } else if user_or_trusted || name.starts_with(b"security.") {
        Policy::BestEffort
    } else {
        Policy::Skip("unsupported namespace")
    }
}

pub(super) fn apply(
    layer: &Layer,
    entry: &str,
    xattrs: &[Xattr],
    target: Target<'_>,
) -> Result<(), ImageError> {
    if xattrs.is_empty() {
        return Ok(());
    }
    let symlink = match target {
        Target::File(_) => false,
        Target::Path(path) => fs::symlink_metadata(path).map_err(layer.failed(entry))?.is_symlink(),
    };
    for xattr in xattrs {
        let name = OsStr::from_bytes(&xattr.name);
        let required = match policy(&xattr.name, symlink) {
            Policy::Required => true,
            Policy::BestEffort => false,
            Policy::Skip(why) => {
                debug!(entry, xattr = %name.to_string_lossy(), why, "skipping extended attribute");
                continue;
            }
        };
        let set = match target {
            Target::File(file) => file.set_xattr(name, &xattr.value),
            // lsetxattr: a symlink gets the attribute itself.
            Target::Path(path) => xattr::set(path, name, &xattr.value),
        };
        let Err(source) = set else { continue };
        let refused = matches!(source.raw_os_error(), Some(e) if e == libc::EPERM || e == libc::EOPNOTSUPP || e == libc::ENOTSUP);
        if refused && !required {
            warn!(layer = %layer.digest, entry, xattr = %name.to_string_lossy(), error = %source,
                "extended attribute not applied");
            continue;
        }
        return Err(ImageError::Xattr {
            layer: layer.digest.clone(),
            entry: entry.to_owned(),
            name: name.to_string_lossy().into_owned(),
            source,
        });
    }
    Ok(())
}
