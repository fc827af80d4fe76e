//! Reading files out of an untrusted OCI layout.
//!
//! - Files are opened without following symlinks or blocking on FIFOs, and must be regular files.
//! - JSON documents (index.json, manifests, configs) are capped at [`MAX_JSON`] bytes.
//! - Blobs are only read from `blobs/sha256/<64 lowercase hex>`, and every blob's size and sha256 are
//!   checked against its descriptor. A [`BlobReader`] hashes as it is read, so a layer streamed into the
//!   rootfs is only known good once [`BlobReader::finish`] says so.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, DigestAlgorithm};
use sha2::{Digest as _, Sha256};

use crate::error::{io_err, ImageError};

/// Largest index.json, manifest or config accepted.
pub const MAX_JSON: u64 = 4 << 20;

/// Opens a layout file for reading without following a symlink or blocking on a FIFO.
pub(crate) fn open_regular(path: &Path) -> Result<File, ImageError> {
    let file =
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
            |e| match e.raw_os_error() {
                Some(libc::ELOOP) => {
                    ImageError::UnsafeLayoutFile { path: path.to_owned(), reason: "is a symlink" }
                }
                _ => ImageError::Io { path: path.to_owned(), source: e },
            },
        )?;
    if !file.metadata().map_err(io_err(path))?.is_file() {
        return Err(ImageError::UnsafeLayoutFile { path: path.to_owned(), reason: "is not a regular file" });
    }
    Ok(file)
}

/// Reads a small layout file (at most [`MAX_JSON`] bytes); `what` names it in errors.
pub(crate) fn read_capped(path: &Path, what: &str) -> Result<Vec<u8>, ImageError> {
    let mut buf = Vec::new();
    open_regular(path)?.take(MAX_JSON + 1).read_to_end(&mut buf).map_err(io_err(path))?;
    if buf.len() as u64 > MAX_JSON {
        return Err(ImageError::TooLarge { what: what.to_owned(), limit: MAX_JSON });
    }
    Ok(buf)
}

/// A blob being read; hashes and counts everything that passes through.
pub(crate) struct BlobReader {
    file: io::Take<File>,
    hasher: Sha256,
    read: u64,
    desc: Descriptor,
    path: PathBuf,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

impl BlobReader {
    /// Reads whatever the consumer left (tar stops at its end marker) and checks size and digest.
    pub(crate) fn finish(&mut self) -> Result<(), ImageError> {
        io::copy(self, &mut io::sink()).map_err(|e| ImageError::Io { path: self.path.clone(), source: e })?;
        let digest = self.desc.digest().to_string();
        if self.read != self.desc.size() {
            return Err(ImageError::SizeMismatch { digest, expected: self.desc.size(), actual: self.read });
        }
        let actual = format!("{:x}", std::mem::take(&mut self.hasher).finalize());
        if actual != self.desc.digest().digest() {
            return Err(ImageError::DigestMismatch { digest, actual });
        }
        Ok(())
    }
}

/// Opens the blob `desc` names, checking its digest is a well-formed sha256 and its size matches.
pub(crate) fn open_blob(layout: &Path, desc: &Descriptor) -> Result<BlobReader, ImageError> {
    let digest = desc.digest();
    let hex = digest.digest();
    let hex_ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if *digest.algorithm() != DigestAlgorithm::Sha256 || !hex_ok {
        return Err(ImageError::UnsupportedDigest(digest.to_string()));
    }
    let path = layout.join("blobs").join("sha256").join(hex);
    let file = match open_regular(&path) {
        Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::MissingBlob { digest: digest.to_string() })
        }
        other => other?,
    };
    // Cheap early check; the authoritative one counts the bytes actually read.
    let len = file.metadata().map_err(io_err(&path))?.len();
    if len != desc.size() {
        return Err(ImageError::SizeMismatch {
            digest: digest.to_string(),
            expected: desc.size(),
            actual: len,
        });
    }
    Ok(BlobReader {
        // One byte past the size so a file that grew is still caught.
        file: file.take(desc.size().saturating_add(1)),
        hasher: Sha256::new(),
        read: 0,
        desc: desc.clone(),
        path,
    })
}

/// Reads and verifies a JSON blob; returns it with a name for error messages.
pub(crate) fn read_json_blob(
    layout: &Path,
    desc: &Descriptor,
    what: &str,
) -> Result<(Vec<u8>, String), ImageError> {
    let what = format!("{what} {}", desc.digest());
    if desc.size() > MAX_JSON {
        return Err(ImageError::TooLarge { what, limit: MAX_JSON });
    }
    let mut blob = open_blob(layout, desc)?;
    let mut buf = Vec::new();
    blob.read_to_end(&mut buf).map_err(io_err(&blob.path))?;
    blob.finish()?;
    Ok((buf, what))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use serde_json::json;

    use super::*;
    use crate::testutil::{
        gzip, sha256_hex, single, tagged, tar_bytes, LayoutBuilder, TempDir, E, TAR, TAR_GZ,
    };
    use crate::unpack;

    #[test]
    fn digest_mismatch_is_detected() {
        let tmp = TempDir::new();
        let layer = tar_bytes(&[E::File("f", b"original", 0o644)]);
        let layout = single(&tmp, &[(TAR, layer.clone())]);
        // Same size, different content: only the hash can tell.
        let mut tampered = layer.clone();
        let at = tampered.windows(8).position(|w| w == b"original").expect("content in tar");
        tampered[at..at + 8].copy_from_slice(b"tampered");
        fs::write(layout.join("blobs/sha256").join(sha256_hex(&layer)), &tampered).expect("tamper");
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");

        // A truncated gzip layer breaks the stream first; the digest mismatch is still what is reported.
        let tmp = TempDir::new();
        let gz = gzip(&tar_bytes(&[E::File("f", &[7u8; 10000], 0o644)]));
        let layout = single(&tmp, &[(TAR_GZ, gz.clone())]);
        let mut bad = gz.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        fs::write(layout.join("blobs/sha256").join(sha256_hex(&gz)), &bad).expect("tamper");
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    }

    #[test]
    fn size_mismatch_and_bad_digests_are_rejected() {
        let tmp = TempDir::new();
        let l = LayoutBuilder::new(tmp.sub("layout"));
        let mut m = l.image(&[(TAR, tar_bytes(&[E::File("f", b"x", 0o644)]))], json!({}));
        m["size"] = json!(m["size"].as_u64().expect("size") + 1);
        l.index(vec![tagged(m.clone(), "t")]);
        let err = unpack(&l.dir, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");

        m["size"] = json!(MAX_JSON + 1);
        l.index(vec![tagged(m.clone(), "t")]);
        let err = unpack(&l.dir, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");

        m["size"] = json!(100);
        m["digest"] = json!(format!("sha512:{}", "a".repeat(128)));
        l.index(vec![tagged(m.clone(), "t")]);
        let err = unpack(&l.dir, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::UnsupportedDigest(_)), "{err}");

        m["digest"] = json!(format!("sha256:{}", "A".repeat(64)));
        l.index(vec![tagged(m.clone(), "t")]);
        assert!(unpack(&l.dir, "t", &tmp.sub("rootfs")).is_err());

        m["digest"] = json!(format!("sha256:{}", "0".repeat(64)));
        l.index(vec![tagged(m, "t")]);
        let err = unpack(&l.dir, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::MissingBlob { .. }), "{err}");
    }
}
