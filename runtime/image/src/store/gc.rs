//! Garbage collection: what no image record needs goes. It runs under the store's exclusive
//! lock, so no pull is adding content and no snapshot is being unpacked meanwhile; every
//! `ingest/` file and `snapshots/tmp-*` directory is then a leftover of a killed process.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use super::{records, Store};
use crate::error::{io_err, ImageError};

/// What a collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs: usize,
    pub snapshots: usize,
    pub partials: usize,
    /// Disk space given back, in bytes (allocated blocks).
    pub freed: u64,
}

pub(super) fn collect(store: &Store) -> Result<GcReport, ImageError> {
    let _gc = records::lock_exclusive(&store.store_lock())?;
    let images = store.images()?;
    let mut keep_blobs: HashSet<String> = HashSet::new();
    let mut keep_snapshots: HashSet<String> = HashSet::new();
    for r in &images {
        keep_blobs.extend([r.digest.clone(), r.config_digest.clone()]);
        keep_blobs.extend(r.index_digest.iter().cloned());
        keep_blobs.extend(r.layers.iter().cloned());
        keep_snapshots.insert(Store::snapshot_key(r));
    }
    let mut report = GcReport::default();

    let blobs = store.dir.join("blobs/sha256");
    for entry in fs::read_dir(&blobs).map_err(io_err(&blobs))? {
        let entry = entry.map_err(io_err(&blobs))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if keep_blobs.contains(&format!("sha256:{name}")) {
            continue;
        }
        report.freed += remove_tree(&entry.path())?;
        report.blobs += 1;
    }

    let ingest = store.dir.join("ingest");
    for entry in fs::read_dir(&ingest).map_err(io_err(&ingest))? {
        let entry = entry.map_err(io_err(&ingest))?;
        report.freed += remove_tree(&entry.path())?;
        report.partials += 1;
    }

    let snapshots = store.snapshots();
    for entry in fs::read_dir(&snapshots).map_err(io_err(&snapshots))? {
        let entry = entry.map_err(io_err(&snapshots))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with("tmp-") {
            report.freed += remove_tree(&path)?;
            report.partials += 1;
            continue;
        }
        let key = name.strip_suffix(".lock").unwrap_or(&name);
        if keep_snapshots.contains(key) || name.ends_with(".lock") {
            continue;
        }
        // A running sandbox holds its snapshot's lock shared: then it stays for a later pass.
        let lock = snapshots.join(format!("{key}.lock"));
        let Some(_held) = try_lock(&lock)? else { continue };
        report.freed += remove_tree(&path)?;
        report.snapshots += 1;
        let _ = fs::remove_file(&lock);
    }
    // Lock files whose snapshot is gone (an unpack that failed, a snapshot removed above).
    for entry in fs::read_dir(&snapshots).map_err(io_err(&snapshots))? {
        let entry = entry.map_err(io_err(&snapshots))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(key) = name.strip_suffix(".lock") else { continue };
        if keep_snapshots.contains(key) || snapshots.join(key).exists() {
            continue;
        }
        if let Some(_held) = try_lock(&entry.path())? {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(report)
}

fn try_lock(path: &Path) -> Result<Option<Flock<fs::File>>, ImageError> {
    match records::lock(path, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err(ImageError::Io { source, .. }) if source.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes a file or directory tree without following symlinks; returns the blocks it held.
fn remove_tree(path: &Path) -> Result<u64, ImageError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut size = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err(path))? {
            size += remove_tree(&entry.map_err(io_err(path))?.path())?;
        }
        fs::remove_dir(path).map_err(io_err(path))?;
    } else {
        fs::remove_file(path).map_err(io_err(path))?;
    }
    Ok(size)
}
