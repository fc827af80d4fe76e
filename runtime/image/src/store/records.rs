//! `images.json`: which names the store holds and what each resolved to. The file is replaced
//! atomically (temp file, fsync, rename) under `records.lock`, so readers never see half a file
//! and two pulls finishing together both land.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{io_err, ImageError};

/// An image the store holds under a name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The full name it was pulled as, e.g. `docker.io/library/alpine:latest`.
    pub name: String,
    /// The image manifest's digest.
    pub digest: String,
    /// The index (manifest list) the name pointed at, when it was one.
    pub index_digest: Option<String>,
    /// `os/arch[/variant]` of the manifest.
    pub platform: String,
    /// The config blob: the image's ID.
    pub config_digest: String,
    pub config_media_type: String,
    pub config_size: u64,
    /// Layer blob digests, bottom first.
    pub layers: Vec<String>,
    /// The layers' uncompressed digests (the config's rootfs.diff_ids), bottom first.
    pub diff_ids: Vec<String>,
    /// Bytes of config and layer blobs (compressed, as stored).
    pub size: u64,
    /// The config's `created`, if any.
    pub created: Option<String>,
    /// When it was pulled, seconds since the epoch.
    pub pulled_at: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RecordsFile {
    version: u32,
    images: Vec<ImageRecord>,
}

const VERSION: u32 = 1;
/// Records, unlike registry documents, are husk's own; the cap only guards against a damaged file.
const MAX_RECORDS_FILE: u64 = 64 << 20;

pub(crate) fn read(path: &Path) -> Result<Vec<ImageRecord>, ImageError> {
    let bytes = match fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
        Ok(b) if b.len() as u64 > MAX_RECORDS_FILE => {
            return Err(ImageError::TooLarge { what: path.display().to_string(), limit: MAX_RECORDS_FILE })
        }
        Ok(b) => b,
    };
    let file: RecordsFile = serde_json::from_slice(&bytes)
        .map_err(|source| ImageError::Json { what: path.display().to_string(), source })?;
    Ok(file.images)
}

/// Applies `change` to the records under the records lock; returns what `change` returned.
pub(crate) fn update<T>(
    path: &Path,
    lock: &Path,
    change: impl FnOnce(&mut Vec<ImageRecord>) -> T,
) -> Result<T, ImageError> {
    let _guard = lock_exclusive(lock)?;
    let mut images = read(path)?;
    let out = change(&mut images);
    let file = RecordsFile { version: VERSION, images };
    let json = serde_json::to_vec_pretty(&file)
        .map_err(|source| ImageError::Json { what: path.display().to_string(), source })?;
    write_atomic(path, &json)?;
    Ok(out)
}

/// Opens (creating) `path` and takes an exclusive lock on it, waiting for it.
pub(crate) fn lock_exclusive(path: &Path) -> Result<Flock<File>, ImageError> {
    lock(path, FlockArg::LockExclusive)
}

pub(crate) fn lock(path: &Path, how: FlockArg) -> Result<Flock<File>, ImageError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path))?;
    Flock::lock(file, how)
        .map_err(|(_, errno)| ImageError::Io { path: path.to_owned(), source: errno.into() })
}

/// Replaces `path` with `bytes` so that readers see the old or the new content, never a mix.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}
