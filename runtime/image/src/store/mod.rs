//! The content store under husk's data root (default `/var/lib/husk`), in `images/`:
//!
//! ```text
//! images/blobs/sha256/<hex>     verified blobs: manifests, indexes, configs, layers
//! images/ingest/*.partial       downloads in progress (see ingest.rs)
//! images/snapshots/<hex>/       one unpacked rootfs per layer chain (see snapshot.rs)
//! images/images.json            names and what they resolved to (see records.rs)
//! images/store.lock             shared by pulls and unpacks, exclusive for garbage collection
//! ```
//!
//! `blobs/` has the shape of an OCI layout's, so the layout readers (verified, capped) read it.
//! Nothing in it is trusted on read either: manifests and configs are hashed again whenever read,
//! and layers are hashed as they are unpacked. The directory is root's alone (0700): snapshots
//! hold the image's setuid binaries and device nodes.

mod gc;
mod ingest;
mod records;
mod snapshot;

use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::FlockArg;
use oci_spec::image::{Descriptor, Digest, ImageManifest, MediaType};
use sha2::{Digest as _, Sha256};

pub use gc::GcReport;
pub(crate) use ingest::Ingest;
pub use records::ImageRecord;
pub use snapshot::Snapshot;

use crate::blob::read_json_blob;
use crate::config::{read_config, ImageConfig};
use crate::error::{io_err, ImageError};
use crate::registry::ImageName;
use crate::unpack::{unpack_layers, UnpackLimits};

/// The image store of one data root.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens the store under `data_root`, creating its directories.
    pub fn open(data_root: &Path) -> Result<Self, ImageError> {
        let dir = data_root.join("images");
        for d in [data_root.to_path_buf(), dir.clone()] {
            match DirBuilder::new().mode(0o700).create(&d) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io_err(&d)(e)),
                _ => {}
            }
        }
        // Whatever made it, the store itself is root's alone.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
        for sub in ["blobs/sha256", "ingest", "snapshots"] {
            let d = dir.join(sub);
            DirBuilder::new().recursive(true).mode(0o700).create(&d).map_err(io_err(&d))?;
        }
        Ok(Self { dir })
    }

    /// `<data root>/images`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn records_path(&self) -> PathBuf {
        self.dir.join("images.json")
    }

    fn records_lock(&self) -> PathBuf {
        self.dir.join("records.lock")
    }

    fn store_lock(&self) -> PathBuf {
        self.dir.join("store.lock")
    }

    fn snapshots(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// Holds off garbage collection while content is added or a snapshot prepared.
    pub(crate) fn shared_lock(&self) -> Result<nix::fcntl::Flock<fs::File>, ImageError> {
        records::lock(&self.store_lock(), FlockArg::LockShared)
    }

    /// The path of blob `digest`, which must be a well-formed sha256 digest.
    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.dir.join("blobs/sha256").join(check_digest(digest)?))
    }

    /// Whether the store has blob `digest` of `size` bytes (its content is verified when read).
    pub(crate) fn has_blob(&self, digest: &str, size: u64) -> bool {
        self.blob_path(digest)
            .ok()
            .and_then(|p| fs::symlink_metadata(p).ok())
            .is_some_and(|m| m.is_file() && m.len() == size)
    }

    /// Starts writing blob `digest`.
    pub(crate) fn ingest(&self, digest: &str, size: u64) -> Result<Ingest, ImageError> {
        Ingest::new(self.dir.join("ingest"), self.blob_path(digest)?, digest, size)
    }

    /// Stores a small document (manifest, index, config) already in memory.
    pub(crate) fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), ImageError> {
        if self.has_blob(digest, bytes.len() as u64) {
            return Ok(());
        }
        let mut w = self.ingest(digest, bytes.len() as u64)?;
        w.write(bytes)?;
        w.commit()
    }

    /// Reads a small blob (at most [`crate::MAX_JSON`] bytes) and checks it hashes to its name.
    pub(crate) fn read_verified(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(digest)?;
        let size = match fs::symlink_metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::MissingBlob { digest: digest.to_owned() })
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let digest: Digest = digest.parse().map_err(|_| ImageError::UnsupportedDigest(digest.to_owned()))?;
        // The store's own size: the digest is what is checked.
        let desc = Descriptor::new(MediaType::Other("blob".into()), size, digest);
        read_json_blob(&self.dir, &desc, "blob").map(|(bytes, _)| bytes)
    }

    /// Every image the store holds, in pull order.
    pub fn images(&self) -> Result<Vec<ImageRecord>, ImageError> {
        records::read(&self.records_path())
    }

    /// Adds or replaces the record of `record.name`.
    pub(crate) fn put_record(&self, record: ImageRecord) -> Result<(), ImageError> {
        records::update(&self.records_path(), &self.records_lock(), |images| {
            images.retain(|r| r.name != record.name);
            images.push(record);
        })
    }

    /// Finds an image by name (Docker's short forms allowed), manifest digest, or ID (the config
    /// digest, or a prefix of at least 4 hex digits of it).
    pub fn find(&self, query: &str) -> Result<Option<ImageRecord>, ImageError> {
        let images = self.images()?;
        let by_name = query.parse::<ImageName>().ok().map(|n| n.to_string());
        if let Some(r) = images.iter().rev().find(|r| r.name == query || Some(&r.name) == by_name.as_ref()) {
            return Ok(Some(r.clone()));
        }
        let hex = query.strip_prefix("sha256:").unwrap_or(query);
        if hex.len() < 4 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let hit = |d: &str| d.strip_prefix("sha256:").is_some_and(|h| h.starts_with(hex));
        let mut found: Vec<&ImageRecord> =
            images.iter().filter(|r| hit(&r.config_digest) || hit(&r.digest)).collect();
        found.dedup_by(|a, b| a.config_digest == b.config_digest);
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some((*one).clone())),
            _ => Err(ImageError::AmbiguousImageId { query: query.to_owned() }),
        }
    }

    /// Removes the records of the images `query` names (every name of that image when `query`
    /// is an ID or digest); returns the names removed.
    pub fn remove(&self, query: &str) -> Result<Vec<String>, ImageError> {
        let Some(found) = self.find(query)? else {
            return Err(ImageError::NoSuchImage { query: query.to_owned() });
        };
        let by_id = query.parse::<ImageName>().map(|n| n.to_string()).ok() != Some(found.name.clone())
            && query != found.name;
        records::update(&self.records_path(), &self.records_lock(), |images| {
            let mut removed = Vec::new();
            images.retain(|r| {
                let hit = if by_id { r.config_digest == found.config_digest } else { r.name == found.name };
                if hit {
                    removed.push(r.name.clone());
                }
                !hit
            });
            removed
        })
    }

    /// The image's manifest, read back and verified.
    pub fn manifest(&self, record: &ImageRecord) -> Result<ImageManifest, ImageError> {
        let bytes = self.read_verified(&record.digest)?;
        serde_json::from_slice(&bytes)
            .map_err(|source| ImageError::Json { what: format!("image manifest {}", record.digest), source })
    }

    /// What the image says to run.
    pub fn config(&self, record: &ImageRecord) -> Result<ImageConfig, ImageError> {
        let digest: Digest = record
            .config_digest
            .parse()
            .map_err(|_| ImageError::UnsupportedDigest(record.config_digest.clone()))?;
        let desc =
            Descriptor::new(MediaType::from(record.config_media_type.as_str()), record.config_size, digest);
        read_config(&self.dir, &desc)
    }

    /// The image's config document as stored (verified).
    pub fn config_json(&self, record: &ImageRecord) -> Result<serde_json::Value, ImageError> {
        let bytes = self.read_verified(&record.config_digest)?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Json {
            what: format!("image config {}", record.config_digest),
            source,
        })
    }

    fn snapshot_key(record: &ImageRecord) -> String {
        match snapshot::chain_id(&record.diff_ids) {
            Some(chain) => chain.trim_start_matches("sha256:").to_owned(),
            // No layers: an empty root, keyed like any other chain.
            None => format!("{:x}", Sha256::digest(b"")),
        }
    }

    /// Where the image's snapshot is (whether or not it exists yet).
    pub fn snapshot_path(&self, record: &ImageRecord) -> PathBuf {
        self.snapshots().join(Self::snapshot_key(record))
    }

    /// The image's unpacked rootfs, unpacking it first if no earlier run did. The returned
    /// [`Snapshot`] keeps it from garbage collection until dropped.
    pub fn snapshot(&self, record: &ImageRecord, limits: &UnpackLimits) -> Result<Snapshot, ImageError> {
        let key = Self::snapshot_key(record);
        let path = self.snapshots().join(&key);
        let _gc = self.shared_lock()?;
        let lease = snapshot::lease(&self.snapshots().join(format!("{key}.lock")))?;
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            return Ok(Snapshot { path, unpacked: false, _lease: lease });
        }
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tmp = self.snapshots().join(format!(
            "tmp-{key}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        DirBuilder::new().mode(0o755).create(&tmp).map_err(io_err(&tmp))?;
        let unpacked = self
            .manifest(record)
            .and_then(|m| unpack_layers(&self.dir, m.layers(), Some(&record.diff_ids), &tmp, limits));
        if let Err(e) = unpacked {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        match fs::rename(&tmp, &path) {
            Ok(()) => Ok(Snapshot { path, unpacked: true, _lease: lease }),
            // Another run of the same image got there first: same content.
            Err(_) if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(Snapshot { path, unpacked: false, _lease: lease })
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(io_err(&path)(e))
            }
        }
    }

    /// Removes every blob, snapshot and partial download that no image needs (snapshots in use
    /// by a running sandbox stay).
    pub fn gc(&self) -> Result<GcReport, ImageError> {
        gc::collect(self)
    }
}

/// The hex part of a `sha256:<64 lowercase hex>` digest; anything else is refused.
pub(crate) fn check_digest(digest: &str) -> Result<&str, ImageError> {
    crate::registry::check_digest(digest).map_err(|_| ImageError::UnsupportedDigest(digest.to_owned()))?;
    Ok(&digest["sha256:".len()..])
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use serde_json::json;

    use super::*;
    use crate::testutil::{gzip, sha256_hex, tar_bytes, TempDir, E, TAR_GZ};

    /// Puts an image of `layers` (uncompressed tars, stored gzipped) into the store as `name`.
    fn add_image(store: &Store, name: &str, layers: &[Vec<u8>]) -> ImageRecord {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for tar in layers {
            let gz = gzip(tar);
            let digest = format!("sha256:{}", sha256_hex(&gz));
            store.put_blob(&digest, &gz).expect("layer");
            descs.push(json!({"mediaType": TAR_GZ, "digest": digest, "size": gz.len()}));
            diff_ids.push(format!("sha256:{}", sha256_hex(tar)));
        }
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .expect("json");
        let config_digest = format!("sha256:{}", sha256_hex(&config));
        store.put_blob(&config_digest, &config).expect("config");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": descs,
        }))
        .expect("json");
        let digest = format!("sha256:{}", sha256_hex(&manifest));
        store.put_blob(&digest, &manifest).expect("manifest");
        let record = ImageRecord {
            name: name.to_string(),
            digest,
            index_digest: None,
            platform: "linux/amd64".into(),
            config_digest,
            config_media_type: "application/vnd.oci.image.config.v1+json".into(),
            config_size: config.len() as u64,
            layers: descs.iter().map(|d| d["digest"].as_str().expect("digest").to_string()).collect(),
            diff_ids,
            size: 0,
            created: None,
            pulled_at: 0,
        };
        store.put_record(record.clone()).expect("record");
        record
    }

    fn count(dir: &Path) -> usize {
        fs::read_dir(dir).expect("ls").count()
    }

    #[test]
    fn snapshots_are_unpacked_once_and_collected_when_unused() {
        let tmp = TempDir::new();
        let store = Store::open(&tmp.0.join("data")).expect("open");
        let base = tar_bytes(&[E::File("bin/sh", b"shell", 0o755), E::File("etc/old", b"o", 0o644)]);
        let top = tar_bytes(&[E::File("etc/.wh.old", b"", 0o644), E::File("app", b"app", 0o644)]);
        let rec = add_image(&store, "example.com/a/b:1", &[base.clone(), top]);
        assert_eq!(store.config(&rec).expect("config").cmd, ["sh"]);

        let limits = UnpackLimits::default();
        let first = store.snapshot(&rec, &limits).expect("snapshot");
        assert!(first.unpacked);
        assert_eq!(fs::read(first.path.join("app")).expect("app"), b"app");
        assert!(!first.path.join("etc/old").exists());
        let ino = fs::metadata(&first.path).expect("stat").ino();
        let second = store.snapshot(&rec, &limits).expect("snapshot again");
        assert!(!second.unpacked, "the second run unpacks nothing");
        assert_eq!(fs::metadata(&second.path).expect("stat").ino(), ino);
        drop(second);

        // Lookups: short name forms, ID prefixes, digests.
        assert_eq!(store.find("example.com/a/b:1").expect("find").map(|r| r.name), Some(rec.name.clone()));
        let id = rec.config_digest.trim_start_matches("sha256:");
        assert!(store.find(&id[..8]).expect("find").is_some());
        assert!(store.find(&rec.digest).expect("find").is_some());
        assert!(store.find("example.com/a/b:2").expect("find").is_none());
        assert!(store.find("abc").expect("find").is_none(), "too short an ID prefix");

        // A second name sharing the base layer.
        let other = add_image(&store, "example.com/a/c:1", &[base]);
        let blobs = store.dir().join("blobs/sha256");
        let before = count(&blobs);

        // Removed while its snapshot is in use: the blobs go, the snapshot stays until released.
        assert_eq!(store.remove("example.com/a/b:1").expect("rm"), ["example.com/a/b:1"]);
        let report = store.gc().expect("gc");
        assert_eq!(report.snapshots, 0);
        assert!(first.path.is_dir());
        assert_eq!(count(&blobs), before - report.blobs);
        assert_eq!(report.blobs, 3, "top layer, config and manifest of b; the shared base stays");
        drop(first);
        let report = store.gc().expect("gc");
        assert_eq!(report.snapshots, 1);
        assert!(report.freed > 0);
        assert!(!store.snapshot_path(&rec).exists());

        let id = other.config_digest.clone();
        assert_eq!(store.remove(&id).expect("rm by id"), ["example.com/a/c:1"]);
        store.gc().expect("gc");
        assert_eq!(count(&blobs), 0);
        assert!(matches!(store.remove("example.com/a/c:1"), Err(ImageError::NoSuchImage { .. })));
    }

    #[test]
    fn a_failed_unpack_leaves_no_snapshot() {
        let tmp = TempDir::new();
        let store = Store::open(&tmp.0.join("data")).expect("open");
        let mut rec = add_image(&store, "example.com/x:1", &[tar_bytes(&[E::File("f", b"f", 0o644)])]);
        rec.diff_ids = vec![format!("sha256:{}", "0".repeat(64))];
        let err = store.snapshot(&rec, &UnpackLimits::default()).expect_err("wrong diff id");
        assert!(matches!(err, ImageError::DiffIdMismatch { .. }), "{err}");
        let left: Vec<_> = fs::read_dir(store.dir().join("snapshots"))
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // A partial download and a stale lock go with the next collection.
        fs::write(store.dir().join("ingest/abc-1-0.partial"), b"half").expect("partial");
        let report = store.gc().expect("gc");
        assert_eq!(report.partials, 1);
        assert_eq!(count(&store.dir().join("snapshots")), 0);
    }
}
