//! Unpacked images: one directory per layer chain under `snapshots/`, named by the chain ID
//! of the image's diff IDs (the OCI/Docker definition), so a second run of an image, or another
//! name for it, unpacks nothing.
//!
//! A snapshot is unpacked into a private `tmp-*` directory and renamed into place only when every
//! layer was applied and verified, so a snapshot that exists is complete. Sandboxes get it
//! read-only (the guest overlays a writable layer), and hold a shared lock on `<chain>.lock` while
//! they run so garbage collection leaves it alone.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest as _, Sha256};

/// The chain ID of `diff_ids` (bottom first): the first diff ID, then
/// `sha256(parent_chain + " " + diff_id)` for each layer above. None for an image without layers.
pub(crate) fn chain_id(diff_ids: &[String]) -> Option<String> {
    let (first, rest) = diff_ids.split_first()?;
    let mut chain = first.clone();
    for diff in rest {
        chain = format!("sha256:{:x}", Sha256::digest(format!("{chain} {diff}").as_bytes()));
    }
    Some(chain)
}

/// A snapshot in use: its directory, kept from garbage collection while this lives.
#[derive(Debug)]
pub struct Snapshot {
    pub path: PathBuf,
    /// Whether this call unpacked it (false: an earlier run did).
    pub unpacked: bool,
    pub(crate) _lease: Flock<File>,
}

impl Snapshot {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes a shared lease on a snapshot's lock file.
pub(crate) fn lease(lock: &Path) -> Result<Flock<File>, crate::ImageError> {
    super::records::lock(lock, FlockArg::LockShared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert_eq!(chain_id(&[]), None);
        assert_eq!(chain_id(std::slice::from_ref(&a)), Some(a.clone()));
        let expect = format!("sha256:{:x}", Sha256::digest(format!("{a} {b}").as_bytes()));
        assert_eq!(chain_id(&[a.clone(), b.clone()]), Some(expect));
        assert_ne!(chain_id(&[a.clone(), b.clone()]), chain_id(&[b, a]));
    }
}
