//! Writing a blob into the store: bytes go to a private file under `ingest/`, are counted and
//! hashed as they arrive, and become visible under `blobs/` only by a rename after both the size
//! and the sha256 match. A pull killed halfway leaves a `*.partial` file that nothing reads and
//! the next garbage collection removes.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::error::{io_err, ImageError};

/// A blob being written; dropped without [`Ingest::commit`], its partial file goes.
#[derive(Debug)]
pub(crate) struct Ingest {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    digest: String,
    size: u64,
    written: u64,
    hasher: Sha256,
    committed: bool,
}

impl Ingest {
    /// Starts writing the blob `digest` ("sha256:<hex>", already checked) of `size` bytes.
    pub(crate) fn new(
        ingest_dir: PathBuf,
        dest: PathBuf,
        digest: &str,
        size: u64,
    ) -> Result<Self, ImageError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let hex = digest.trim_start_matches("sha256:");
        let name = format!("{hex}-{}-{}.partial", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let tmp = ingest_dir.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        Ok(Self {
            file,
            tmp,
            dest,
            digest: digest.to_owned(),
            size,
            written: 0,
            hasher: Sha256::new(),
            committed: false,
        })
    }

    /// Appends a chunk; more bytes than the descriptor's size is an error at once (a registry
    /// that streams on for ever does not fill the disk).
    pub(crate) fn write(&mut self, chunk: &[u8]) -> Result<(), ImageError> {
        let after = self.written.saturating_add(chunk.len() as u64);
        if after > self.size {
            return Err(ImageError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: after,
            });
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk).map_err(io_err(&self.tmp))?;
        self.written = after;
        Ok(())
    }

    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Checks size and digest, makes the bytes durable, and moves the blob into place. A blob
    /// another pull committed first is the same bytes: the rename replaces it harmlessly.
    pub(crate) fn commit(mut self) -> Result<(), ImageError> {
        if self.written != self.size {
            return Err(ImageError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: self.written,
            });
        }
        let actual = format!("{:x}", std::mem::take(&mut self.hasher).finalize());
        if format!("sha256:{actual}") != self.digest {
            return Err(ImageError::DigestMismatch { digest: self.digest.clone(), actual });
        }
        self.file.sync_all().map_err(io_err(&self.tmp))?;
        fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{sha256_hex, TempDir};

    #[test]
    fn only_verified_blobs_become_visible() {
        let tmp = TempDir::new();
        let (ingest, blobs) = (tmp.sub("ingest"), tmp.sub("blobs"));
        let data = b"hello blob";
        let digest = format!("sha256:{}", sha256_hex(data));
        let dest = blobs.join("good");

        let mut w = Ingest::new(ingest.clone(), dest.clone(), &digest, data.len() as u64).expect("new");
        w.write(&data[..5]).expect("write");
        assert!(!dest.exists(), "nothing visible while writing");
        drop(w);
        assert_eq!(fs::read_dir(&ingest).expect("ls").count(), 0, "a dropped ingest leaves nothing");

        let mut w = Ingest::new(ingest.clone(), dest.clone(), &digest, data.len() as u64).expect("new");
        w.write(b"hello blub").expect("write");
        assert!(matches!(w.commit(), Err(ImageError::DigestMismatch { .. })));
        assert!(!dest.exists());

        let mut w = Ingest::new(ingest.clone(), dest.clone(), &digest, data.len() as u64).expect("new");
        assert!(matches!(w.write(b"hello blob and more"), Err(ImageError::SizeMismatch { .. })));
        drop(w);

        let mut w = Ingest::new(ingest.clone(), dest.clone(), &digest, data.len() as u64).expect("new");
        w.write(b"hello").expect("write");
        assert!(matches!(w.commit(), Err(ImageError::SizeMismatch { .. })));

        let mut w = Ingest::new(ingest.clone(), dest.clone(), &digest, data.len() as u64).expect("new");
        w.write(data).expect("write");
        w.commit().expect("commit");
        assert_eq!(fs::read(&dest).expect("read"), data);
        assert_eq!(fs::read_dir(&ingest).expect("ls").count(), 0);
    }
}
