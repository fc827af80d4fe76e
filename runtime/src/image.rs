//! Unpacks an image from an OCI image layout (as written by `umoci` or `skopeo copy ... oci:DIR:TAG`)
//! into a directory and returns what the image says to run.
//!
//! The layout is untrusted input:
//! - JSON documents (index.json, manifests, configs) are capped at [`MAX_JSON`] bytes.
//! - Blobs are only read from `blobs/sha256/<64 lowercase hex>`, opened without following symlinks, and
//!   every blob's size and sha256 are checked against its descriptor. Layers are hashed as they are
//!   extracted, so a tampered layer is reported after its entries were written: on any error the caller
//!   must throw `dest` away.
//! - Entries with absolute paths or `..` components are rejected, and nothing is ever written, linked or
//!   deleted through a symlink: every parent component under `dest` must be a real directory. Unlike
//!   containerd this does not resolve symlinks within the rootfs; layer diffs taken from an overlay
//!   upper directory never need that.
//!
//! Choices:
//! - Permissions (with setuid/setgid/sticky bits), mtimes and symlinks are preserved. Ownership (the
//!   numeric uid/gid, never the user names) only when running as root; otherwise the caller owns all.
//!   Directory modes and mtimes are applied after the last layer, so a read-only directory does not block
//!   later entries and creating children does not clobber the mtimes. Since setuid-root binaries land
//!   on the host, `dest` should sit in a directory that only root can traverse.
//! - Character/block devices and FIFOs are skipped, even as root: an image-supplied device node on the
//!   host filesystem (say a world-writable disk) would be a host hole, and the guest mounts its own /dev.
//! - Extended attributes (e.g. `security.capability`) are not applied, and the rootfs root entry's own
//!   metadata is ignored so `dest` keeps the mode the caller gave it.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, FileTimes, OpenOptions};
use std::io::{self, Read};
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use flate2::read::MultiGzDecoder;
use oci_spec::image::{
    Arch, Descriptor, DigestAlgorithm, ImageConfiguration, ImageIndex, ImageManifest, MediaType, OciLayout,
    Os,
};
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

/// Largest index.json, manifest or config accepted.
pub const MAX_JSON: u64 = 4 << 20;
/// How deep image indexes may nest before the layout is considered hostile.
const MAX_INDEX_DEPTH: usize = 4;
const DEFAULT_TAG: &str = "latest";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_FOREIGN_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// What the image says to run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not an OCI image layout: {reason}")]
    NotALayout { path: PathBuf, reason: String },
    #[error("unsupported OCI image layout version {0:?} (want 1.x)")]
    UnsupportedLayoutVersion(String),
    #[error("{path} {reason}; refusing to read it")]
    UnsafeLayoutFile { path: PathBuf, reason: &'static str },
    #[error("{what} is larger than the {limit}-byte limit")]
    TooLarge { what: String, limit: u64 },
    #[error("invalid JSON in {what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported digest {0:?}: only sha256 with 64 lowercase hex digits is accepted")]
    UnsupportedDigest(String),
    #[error("blob {digest} is missing from the layout")]
    MissingBlob { digest: String },
    #[error("blob {digest} is {actual} bytes but its descriptor says {expected}")]
    SizeMismatch { digest: String, expected: u64, actual: u64 },
    #[error("blob {digest} does not match its digest: content hashes to sha256:{actual}")]
    DigestMismatch { digest: String, actual: String },
    #[error("tag {tag:?} not found in the layout; available tags: {}", list_or_none(available))]
    UnknownTag { tag: String, available: Vec<String> },
    #[error("no tag given and the layout holds {count} images; available tags: {}", list_or_none(available))]
    AmbiguousImage { count: usize, available: Vec<String> },
    #[error("image index {digest} has no linux/amd64 manifest")]
    NoMatchingPlatform { digest: String },
    #[error("image indexes nest more than {MAX_INDEX_DEPTH} deep")]
    IndexTooDeep,
    #[error("unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType { what: &'static str, media_type: String },
    #[error("layer {digest}: unsupported media type {media_type:?} (supported: tar, tar+gzip; not zstd)")]
    UnsupportedLayer { digest: String, media_type: String },
    #[error("destination {path} must be an existing empty directory")]
    BadDestination { path: PathBuf },
    #[error("layer {layer}: refusing entry {entry:?}: {reason}")]
    UnsafeEntry { layer: String, entry: String, reason: &'static str },
    #[error("layer {layer}: entry {entry:?}: {source}")]
    Extract {
        layer: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: reading the archive: {source}")]
    Archive {
        layer: String,
        #[source]
        source: io::Error,
    },
}

fn list_or_none(tags: &[String]) -> String {
    if tags.is_empty() {
        "(none)".to_owned()
    } else {
        tags.join(", ")
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_owned(), source }
}

/// Parses "DIR:TAG" (TAG optional, default "latest"; split at the LAST ':' only if what follows has no '/').
pub fn parse_reference(s: &str) -> Result<(PathBuf, String), ImageError> {
    let bad = |reason| ImageError::InvalidReference { reference: s.to_owned(), reason };
    let (dir, tag) = match s.rsplit_once(':') {
        Some((dir, tag)) if !tag.contains('/') => (dir, tag),
        _ => (s, DEFAULT_TAG),
    };
    if dir.is_empty() {
        return Err(bad("empty layout directory"));
    }
    if tag.is_empty() {
        return Err(bad("empty tag"));
    }
    Ok((PathBuf::from(dir), tag.to_owned()))
}

/// Unpacks the image tagged `tag` (index.json manifest whose annotation org.opencontainers.image.ref.name
/// == tag; if the index has exactly one manifest and no tag was asked for, use it; if a manifest entry is
/// itself an image index, pick linux/amd64) into `dest` (must exist, empty dir), applying layers in order.
///
/// "No tag" is `tag == ""`. As `parse_reference` turns a bare "DIR" into "DIR:latest", a layout whose only
/// manifest carries no ref.name at all (`skopeo copy ... oci:DIR`) is also taken for "latest".
pub fn unpack(layout: &Path, tag: &str, dest: &Path) -> Result<ImageConfig, ImageError> {
    let dest = check_destination(dest)?;
    check_layout_marker(layout)?;
    let index_path = layout.join("index.json");
    let index: ImageIndex =
        serde_json::from_slice(&read_capped(&index_path, "index.json")?).map_err(json_err("index.json"))?;
    let manifest = resolve_manifest(layout, select_manifest(&index, tag)?)?;
    // Read the config before touching dest so a bad config fails fast.
    let config = read_config(layout, manifest.config())?;
    let mut unpacker = Unpacker { dest, as_root: is_root(), dirs: BTreeMap::new() };
    for layer in manifest.layers() {
        unpacker.apply_layer(layout, layer)?;
    }
    unpacker.finish()?;
    Ok(config)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn check_destination(dest: &Path) -> Result<PathBuf, ImageError> {
    let bad = || ImageError::BadDestination { path: dest.to_owned() };
    // Resolved once so every path built below is free of symlinks the caller may have used.
    let dest = fs::canonicalize(dest).map_err(|_| bad())?;
    let mut entries = fs::read_dir(&dest).map_err(|_| bad())?;
    if entries.next().is_some() {
        return Err(bad());
    }
    Ok(dest)
}

fn check_layout_marker(layout: &Path) -> Result<(), ImageError> {
    let path = layout.join("oci-layout");
    let not_layout = |reason: String| ImageError::NotALayout { path: layout.to_owned(), reason };
    let bytes = match read_capped(&path, "oci-layout") {
        Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(not_layout("no oci-layout file".to_owned()))
        }
        other => other?,
    };
    let marker: OciLayout =
        serde_json::from_slice(&bytes).map_err(|e| not_layout(format!("bad oci-layout file: {e}")))?;
    let version = marker.image_layout_version();
    if !version.starts_with("1.") {
        return Err(ImageError::UnsupportedLayoutVersion(version.clone()));
    }
    Ok(())
}

/// Opens a layout file for reading without following a symlink or blocking on a FIFO.
fn open_regular(path: &Path) -> Result<File, ImageError> {
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

fn read_capped(path: &Path, what: &str) -> Result<Vec<u8>, ImageError> {
    let mut buf = Vec::new();
    open_regular(path)?.take(MAX_JSON + 1).read_to_end(&mut buf).map_err(io_err(path))?;
    if buf.len() as u64 > MAX_JSON {
        return Err(ImageError::TooLarge { what: what.to_owned(), limit: MAX_JSON });
    }
    Ok(buf)
}

fn json_err(what: &str) -> impl FnOnce(serde_json::Error) -> ImageError + '_ {
    move |source| ImageError::Json { what: what.to_owned(), source }
}

/// A blob being read; hashes and counts everything that passes through.
struct BlobReader {
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
    fn finish(&mut self) -> Result<(), ImageError> {
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

fn open_blob(layout: &Path, desc: &Descriptor) -> Result<BlobReader, ImageError> {
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
fn read_json_blob(layout: &Path, desc: &Descriptor, what: &str) -> Result<(Vec<u8>, String), ImageError> {
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

fn ref_name(desc: &Descriptor) -> Option<&str> {
    desc.annotations().as_ref()?.get(REF_NAME).map(String::as_str)
}

fn select_manifest<'a>(index: &'a ImageIndex, tag: &str) -> Result<&'a Descriptor, ImageError> {
    let manifests = index.manifests();
    if !tag.is_empty() {
        if let Some(desc) = manifests.iter().find(|d| ref_name(d) == Some(tag)) {
            return Ok(desc);
        }
    }
    if let [only] = manifests.as_slice() {
        if tag.is_empty() || (tag == DEFAULT_TAG && ref_name(only).is_none()) {
            return Ok(only);
        }
    }
    let mut available: Vec<String> = manifests.iter().filter_map(ref_name).map(str::to_owned).collect();
    available.sort();
    available.dedup();
    if tag.is_empty() {
        return Err(ImageError::AmbiguousImage { count: manifests.len(), available });
    }
    Err(ImageError::UnknownTag { tag: tag.to_owned(), available })
}

fn is_index(media_type: &MediaType) -> bool {
    match media_type {
        MediaType::ImageIndex => true,
        MediaType::Other(s) => s == DOCKER_MANIFEST_LIST,
        _ => false,
    }
}

fn is_manifest(media_type: &MediaType) -> bool {
    match media_type {
        MediaType::ImageManifest => true,
        MediaType::Other(s) => s == DOCKER_MANIFEST,
        _ => false,
    }
}

fn is_linux_amd64(desc: &Descriptor) -> bool {
    desc.platform().as_ref().is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
}

fn resolve_manifest(layout: &Path, desc: &Descriptor) -> Result<ImageManifest, ImageError> {
    let mut desc = desc.clone();
    for _ in 0..=MAX_INDEX_DEPTH {
        let media_type = desc.media_type();
        if is_manifest(media_type) {
            let (bytes, what) = read_json_blob(layout, &desc, "image manifest")?;
            return serde_json::from_slice(&bytes).map_err(json_err(&what));
        }
        if !is_index(media_type) {
            return Err(ImageError::UnsupportedMediaType {
                what: "a manifest",
                media_type: media_type.to_string(),
            });
        }
        let (bytes, what) = read_json_blob(layout, &desc, "image index")?;
        let index: ImageIndex = serde_json::from_slice(&bytes).map_err(json_err(&what))?;
        desc = match index.manifests().iter().find(|d| is_linux_amd64(d)) {
            Some(d) => d.clone(),
            None => return Err(ImageError::NoMatchingPlatform { digest: desc.digest().to_string() }),
        };
    }
    Err(ImageError::IndexTooDeep)
}

fn read_config(layout: &Path, desc: &Descriptor) -> Result<ImageConfig, ImageError> {
    match desc.media_type() {
        MediaType::ImageConfig => {}
        MediaType::Other(s) if s == DOCKER_CONFIG => {}
        other => {
            return Err(ImageError::UnsupportedMediaType {
                what: "an image config",
                media_type: other.to_string(),
            })
        }
    }
    let (bytes, what) = read_json_blob(layout, desc, "image config")?;
    let image: ImageConfiguration = serde_json::from_slice(&bytes).map_err(json_err(&what))?;
    if *image.os() != Os::Linux || *image.architecture() != Arch::Amd64 {
        warn!(os = %image.os(), arch = %image.architecture(), "image is not built for linux/amd64");
    }
    let Some(config) = image.config() else { return Ok(ImageConfig::default()) };
    Ok(ImageConfig {
        env: config.env().clone().unwrap_or_default(),
        entrypoint: config.entrypoint().clone().unwrap_or_default(),
        cmd: config.cmd().clone().unwrap_or_default(),
        working_dir: config.working_dir().clone().unwrap_or_default(),
        user: config.user().clone().unwrap_or_default(),
    })
}

#[derive(Clone, Copy)]
enum Compression {
    None,
    Gzip,
}

fn layer_compression(desc: &Descriptor) -> Result<Compression, ImageError> {
    match desc.media_type() {
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Ok(Compression::None),
        MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => Ok(Compression::Gzip),
        MediaType::Other(s) if s == DOCKER_LAYER_GZIP || s == DOCKER_FOREIGN_LAYER_GZIP => {
            Ok(Compression::Gzip)
        }
        other => Err(ImageError::UnsupportedLayer {
            digest: desc.digest().to_string(),
            media_type: other.to_string(),
        }),
    }
}

/// Turns an entry path into a relative one with only normal components, or None if it is absolute or
/// climbs with `..`. `./x`, `x/` and `x//y` are fine.
fn clean_path(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return None,
        }
    }
    Some(out)
}

/// Removes whatever is at `path` without following a symlink there.
fn remove_any(path: &Path) -> Result<(), ImageError> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(io_err(path))
}

fn mtime(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

struct DirMeta {
    mode: u32,
    mtime: u64,
}

struct Unpacker {
    dest: PathBuf,
    as_root: bool,
    /// Mode and mtime of every directory entry, by path relative to dest, applied by `finish`.
    dirs: BTreeMap<PathBuf, DirMeta>,
}

/// Per-layer state.
struct Layer {
    digest: String,
    /// Paths this layer has created, with all their ancestors: whiteouts and opaque markers only hide
    /// what lower layers put there.
    touched: HashSet<PathBuf>,
}

impl Layer {
    fn touch(&mut self, rel: &Path) {
        let mut path = Some(rel);
        while let Some(p) = path.filter(|p| !p.as_os_str().is_empty()) {
            if !self.touched.insert(p.to_owned()) {
                break; // its ancestors are in already
            }
            path = p.parent();
        }
    }

    fn refuse(&self, entry: &str, reason: &'static str) -> ImageError {
        ImageError::UnsafeEntry { layer: self.digest.clone(), entry: entry.to_owned(), reason }
    }

    fn failed(&self, entry: &str) -> impl FnOnce(io::Error) -> ImageError + '_ {
        let entry = entry.to_owned();
        move |source| ImageError::Extract { layer: self.digest.clone(), entry, source }
    }
}

impl Unpacker {
    fn apply_layer(&mut self, layout: &Path, desc: &Descriptor) -> Result<(), ImageError> {
        let compression = layer_compression(desc)?;
        let mut layer = Layer { digest: desc.digest().to_string(), touched: HashSet::new() };
        debug!(layer = %layer.digest, size = desc.size(), "applying layer");
        let mut blob = open_blob(layout, desc)?;
        let extracted = match compression {
            Compression::None => self.extract(&mut layer, tar::Archive::new(&mut blob)),
            Compression::Gzip => self.extract(&mut layer, tar::Archive::new(MultiGzDecoder::new(&mut blob))),
        };
        // A tampered blob usually breaks the gzip or tar stream first: the digest mismatch is the better
        // explanation, so it wins.
        blob.finish()?;
        extracted
    }

    fn extract<R: Read>(
        &mut self,
        layer: &mut Layer,
        mut archive: tar::Archive<R>,
    ) -> Result<(), ImageError> {
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        archive.set_preserve_ownerships(self.as_root);
        archive.set_unpack_xattrs(false);
        let archive_err = |source| ImageError::Archive { layer: layer.digest.clone(), source };
        let entries = archive.entries().map_err(archive_err)?;
        for entry in entries {
            let mut entry =
                entry.map_err(|source| ImageError::Archive { layer: layer.digest.clone(), source })?;
            self.apply_entry(layer, &mut entry)?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        layer: &mut Layer,
        entry: &mut tar::Entry<R>,
    ) -> Result<(), ImageError> {
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let path = entry.path().map_err(layer.failed(&name))?;
        let rel = clean_path(&path).ok_or_else(|| layer.refuse(&name, "absolute path or '..' component"))?;
        let Some(file_name) = rel.file_name().map(OsStr::as_bytes) else {
            return Ok(()); // the rootfs root itself: dest keeps its own metadata
        };
        if file_name == OPAQUE_MARKER {
            return self.make_opaque(layer, &name, rel.parent().unwrap_or(Path::new("")));
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.starts_with(WHITEOUT_PREFIX) {
                debug!(entry = %name, "skipping aufs metadata");
                return Ok(());
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(layer.refuse(&name, "whiteout of an invalid name"));
            }
            return self.whiteout(layer, &name, &rel.with_file_name(OsStr::from_bytes(hidden)));
        }

        let header = entry.header();
        let kind = header.entry_type();
        // Old-style (pre-ustar) archives mark directories with a trailing slash only, as tar itself honours.
        let is_dir = kind.is_dir() || (header.as_ustar().is_none() && entry.path_bytes().ends_with(b"/"));
        use tar::EntryType as T;
        match kind {
            _ if is_dir => {}
            T::Regular | T::Continuous | T::GNUSparse | T::Symlink | T::Link => {}
            T::Char | T::Block | T::Fifo => {
                debug!(entry = %name, "skipping device node or FIFO");
                return Ok(());
            }
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => return Ok(()),
            other => {
                warn!(entry = %name, kind = ?other, "skipping tar entry of unknown type");
                return Ok(());
            }
        }

        self.parent_dir(layer, &name, &rel, true)?;
        layer.touch(&rel);
        let target = self.dest.join(&rel);
        // A layer's entry replaces whatever lower layers had there, except that directories merge.
        match fs::symlink_metadata(&target) {
            Ok(m) if is_dir && m.is_dir() => {}
            Ok(_) => {
                remove_any(&target)?;
                self.forget_dirs(&rel);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(layer.failed(&name)(e)),
        }

        if is_dir {
            self.unpack_dir(layer, &name, entry, &rel, &target)
        } else if kind == T::Link {
            self.unpack_hard_link(layer, &name, entry, &target)
        } else {
            // Files are created with O_EXCL (we removed any old one) and symlinks are stored verbatim;
            // their targets are never followed here. The full path is passed: `unpack_in` would also
            // strip a leading '/', silently skip '..' and follow symlinks inside dest.
            entry.unpack(&target).map(drop).map_err(layer.failed(&name))
        }
    }

    /// Checks that every parent of `rel` is a real directory under dest, creating missing ones if asked.
    /// Returns false if one is missing and `create` is false.
    fn parent_dir(&self, layer: &Layer, name: &str, rel: &Path, create: bool) -> Result<bool, ImageError> {
        let Some(parent) = rel.parent() else { return Ok(true) };
        let mut cur = self.dest.clone();
        for component in parent.components() {
            cur.push(component);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(layer.refuse(name, "a parent directory is a symlink"))
                }
                Ok(_) => return Err(layer.refuse(name, "a parent path is not a directory")),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    // Implied directories are 0755 whatever the umask, as docker makes them.
                    DirBuilder::new().create(&cur).map_err(layer.failed(name))?;
                    fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                        .map_err(layer.failed(name))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(layer.failed(name)(e)),
            }
        }
        Ok(true)
    }

    fn unpack_dir<R: Read>(
        &mut self,
        layer: &Layer,
        name: &str,
        entry: &tar::Entry<R>,
        rel: &Path,
        target: &Path,
    ) -> Result<(), ImageError> {
        let header = entry.header();
        let failed = |e| layer.failed(name)(e);
        let mode = header.mode().map_err(failed)? & 0o7777;
        let mtime = header.mtime().map_err(failed)?;
        // Owner-writable until `finish` sets the real mode, so later entries can go in.
        match DirBuilder::new().mode(0o755).create(target) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(failed(e)),
            _ => {}
        }
        if self.as_root {
            let id = |v: u64| u32::try_from(v).map_err(|_| io::Error::other(format!("id {v} out of range")));
            let uid = id(header.uid().map_err(failed)?).map_err(failed)?;
            let gid = id(header.gid().map_err(failed)?).map_err(failed)?;
            std::os::unix::fs::lchown(target, Some(uid), Some(gid)).map_err(failed)?;
        }
        self.dirs.insert(rel.to_owned(), DirMeta { mode, mtime });
        Ok(())
    }

    fn unpack_hard_link<R: Read>(
        &self,
        layer: &Layer,
        name: &str,
        entry: &tar::Entry<R>,
        target: &Path,
    ) -> Result<(), ImageError> {
        let link = entry.link_name().map_err(layer.failed(name))?;
        let link = link.ok_or_else(|| layer.refuse(name, "hard link without a target"))?;
        let src_rel = clean_path(&link)
            .ok_or_else(|| layer.refuse(name, "hard link target is absolute or has '..'"))?;
        if src_rel.as_os_str().is_empty() || !self.parent_dir(layer, name, &src_rel, false)? {
            return Err(layer.refuse(name, "hard link target does not exist"));
        }
        let src = self.dest.join(&src_rel);
        match fs::symlink_metadata(&src) {
            Ok(m) if m.is_dir() => Err(layer.refuse(name, "hard link target is a directory")),
            // link(2) does not follow a symlink in src, so linking to one is safe.
            Ok(_) => fs::hard_link(&src, target).map_err(layer.failed(name)),
            Err(_) => Err(layer.refuse(name, "hard link target does not exist")),
        }
    }

    fn whiteout(&mut self, layer: &Layer, name: &str, rel: &Path) -> Result<(), ImageError> {
        if layer.touched.contains(rel) || !self.parent_dir(layer, name, rel, false)? {
            return Ok(()); // from this same layer, or nothing below to hide
        }
        debug!(path = %rel.display(), "whiteout");
        remove_any(&self.dest.join(rel))?;
        self.forget_dirs(rel);
        Ok(())
    }

    fn make_opaque(&mut self, layer: &mut Layer, name: &str, rel: &Path) -> Result<(), ImageError> {
        // The marker implies `rel` is a directory of this layer, just as `rel/x` would.
        self.parent_dir(layer, name, &rel.join(OsStr::from_bytes(OPAQUE_MARKER)), true)?;
        layer.touch(rel);
        debug!(path = %rel.display(), "opaque directory");
        self.clear_lower(layer, &self.dest.join(rel), rel)
    }

    /// Removes everything under `dir` that this layer did not put there.
    fn clear_lower(&mut self, layer: &Layer, dir: &Path, rel: &Path) -> Result<(), ImageError> {
        for child in fs::read_dir(dir).map_err(io_err(dir))? {
            let child = child.map_err(io_err(dir))?;
            let child_rel = rel.join(child.file_name());
            let child_path = child.path();
            if !layer.touched.contains(&child_rel) {
                remove_any(&child_path)?;
                self.forget_dirs(&child_rel);
            } else if child.file_type().map_err(io_err(&child_path))?.is_dir() {
                self.clear_lower(layer, &child_path, &child_rel)?;
            }
        }
        Ok(())
    }

    /// Drops the recorded metadata of `rel` and everything below it once they are gone.
    fn forget_dirs(&mut self, rel: &Path) {
        // Paths order by component, so a subtree is one contiguous run starting at its root.
        let doomed: Vec<PathBuf> = self
            .dirs
            .range::<Path, _>((Bound::Included(rel), Bound::Unbounded))
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(rel))
            .cloned()
            .collect();
        for key in doomed {
            self.dirs.remove(&key);
        }
    }

    /// Applies directory modes and mtimes, children before parents so a restrictive parent mode cannot
    /// lock us out of its children.
    fn finish(self) -> Result<(), ImageError> {
        for (rel, meta) in self.dirs.iter().rev() {
            let path = self.dest.join(rel);
            // Through an fd opened without following symlinks: every later call acts on this very directory.
            let dir = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
                .open(&path)
                .map_err(io_err(&path))?;
            dir.set_permissions(fs::Permissions::from_mode(meta.mode)).map_err(io_err(&path))?;
            let t = mtime(meta.mtime);
            dir.set_times(FileTimes::new().set_accessed(t).set_modified(t)).map_err(io_err(&path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicU32, Ordering};

    use flate2::write::GzEncoder;
    use serde_json::{json, Value};

    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    /// A directory removed on drop (no tempfile dependency for one helper).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("husk-image-test-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            TempDir(path)
        }

        fn sub(&self, name: &str) -> PathBuf {
            let p = self.0.join(name);
            fs::create_dir_all(&p).expect("create subdir");
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    enum E<'a> {
        Dir(&'a str, u32),
        File(&'a str, &'a [u8], u32),
        Symlink(&'a str, &'a str),
        Hardlink(&'a str, &'a str),
        /// A file whose name is written raw into the header, bypassing the tar crate's own checks.
        RawFile(&'a str),
        /// A hard link whose target is written raw.
        RawHardlink(&'a str, &'a str),
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(1234);
        h.set_gid(4321);
        h
    }

    fn raw_name(h: &mut tar::Header, name: &str) {
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
    }

    fn raw_link(h: &mut tar::Header, name: &str) {
        let field = &mut h.as_old_mut().linkname;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
    }

    fn tar_bytes(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            match *e {
                E::Dir(path, mode) => {
                    let mut h = header(tar::EntryType::Directory, mode, 0);
                    b.append_data(&mut h, path, io::empty()).expect("dir");
                }
                E::File(path, data, mode) => {
                    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
                    b.append_data(&mut h, path, data).expect("file");
                }
                E::Symlink(path, target) => {
                    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                    b.append_link(&mut h, path, target).expect("symlink");
                }
                E::Hardlink(path, target) => {
                    let mut h = header(tar::EntryType::Link, 0o644, 0);
                    b.append_link(&mut h, path, target).expect("hardlink");
                }
                E::RawFile(path) => {
                    let mut h = header(tar::EntryType::Regular, 0o644, 4);
                    raw_name(&mut h, path);
                    h.set_cksum();
                    b.append(&h, &b"evil"[..]).expect("raw file");
                }
                E::RawHardlink(path, target) => {
                    let mut h = header(tar::EntryType::Link, 0o644, 0);
                    raw_name(&mut h, path);
                    raw_link(&mut h, target);
                    h.set_cksum();
                    b.append(&h, io::empty()).expect("raw link");
                }
            }
        }
        b.into_inner().expect("finish tar")
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).expect("gzip");
        enc.finish().expect("gzip")
    }

    fn sha256_hex(data: &[u8]) -> String {
        format!("{:x}", Sha256::digest(data))
    }

    /// Builds layouts blob by blob.
    struct LayoutBuilder {
        dir: PathBuf,
    }

    impl LayoutBuilder {
        fn new(dir: PathBuf) -> Self {
            fs::create_dir_all(dir.join("blobs/sha256")).expect("blobs dir");
            fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
            LayoutBuilder { dir }
        }

        fn blob(&self, media_type: &str, data: &[u8]) -> Value {
            let hex = sha256_hex(data);
            fs::write(self.dir.join("blobs/sha256").join(&hex), data).expect("write blob");
            json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()})
        }

        fn json_blob(&self, media_type: &str, value: &Value) -> Value {
            self.blob(media_type, &serde_json::to_vec(value).expect("json"))
        }

        fn image(&self, layers: &[(&str, Vec<u8>)], config: Value) -> Value {
            let layers: Vec<Value> = layers.iter().map(|(mt, data)| self.blob(mt, data)).collect();
            let config = json!({
                "architecture": "amd64",
                "os": "linux",
                "config": config,
                "rootfs": {"type": "layers", "diff_ids": []},
            });
            let config = self.json_blob("application/vnd.oci.image.config.v1+json", &config);
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config,
                "layers": layers,
            });
            self.json_blob("application/vnd.oci.image.manifest.v1+json", &manifest)
        }

        fn index(&self, manifests: Vec<Value>) {
            let index = json!({"schemaVersion": 2, "manifests": manifests});
            fs::write(self.dir.join("index.json"), serde_json::to_vec(&index).expect("json")).expect("index");
        }
    }

    fn tagged(mut desc: Value, tag: &str) -> Value {
        desc["annotations"] = json!({ REF_NAME: tag });
        desc
    }

    /// A layout holding one image tagged "t" made of `layers`.
    fn single(tmp: &TempDir, layers: &[(&str, Vec<u8>)]) -> PathBuf {
        let l = LayoutBuilder::new(tmp.sub("layout"));
        let m = l.image(layers, json!({}));
        l.index(vec![tagged(m, "t")]);
        l.dir
    }

    #[test]
    fn basic_unpack_and_config() {
        let tmp = TempDir::new();
        let l = LayoutBuilder::new(tmp.sub("layout"));
        let layer = tar_bytes(&[
            E::Dir("./", 0o755),
            E::Dir("./etc/", 0o750),
            E::File("./etc/hello", b"hi\n", 0o640),
            E::Dir("bin", 0o755),
            E::File("bin/busybox", b"\x7fELF", 0o4755),
            E::Symlink("bin/sh", "busybox"),
            E::Hardlink("bin/ls", "bin/busybox"),
            // link(2) on a symlink links the symlink itself, which is harmless.
            E::Hardlink("bin/sh2", "bin/sh"),
            E::File("deep/implicit/parent", b"x", 0o600),
            E::Dir("tmp", 0o1777),
        ]);
        let m = l.image(
            &[(TAR_GZ, gzip(&layer))],
            json!({
                "Env": ["PATH=/bin", "A=b"],
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["echo hi"],
                "WorkingDir": "/etc",
                "User": "1000:1000",
            }),
        );
        l.index(vec![tagged(m, "t")]);
        let dest = tmp.sub("rootfs");
        let config = unpack(&l.dir, "t", &dest).expect("unpack");
        assert_eq!(
            config,
            ImageConfig {
                env: vec!["PATH=/bin".into(), "A=b".into()],
                entrypoint: vec!["/bin/sh".into(), "-c".into()],
                cmd: vec!["echo hi".into()],
                working_dir: "/etc".into(),
                user: "1000:1000".into(),
            }
        );
        assert_eq!(fs::read(dest.join("etc/hello")).expect("read"), b"hi\n");
        let hello = fs::metadata(dest.join("etc/hello")).expect("stat");
        assert_eq!(hello.mode() & 0o7777, 0o640);
        assert_eq!(hello.mtime(), 1_600_000_000);
        let etc = fs::metadata(dest.join("etc")).expect("stat");
        assert_eq!(etc.mode() & 0o7777, 0o750);
        assert_eq!(etc.mtime(), 1_600_000_000, "dir mtime survives files created in it");
        assert_eq!(fs::metadata(dest.join("tmp")).expect("stat").mode() & 0o7777, 0o1777);
        assert_eq!(fs::metadata(dest.join("bin/busybox")).expect("stat").mode() & 0o7777, 0o4755);
        assert_eq!(fs::read_link(dest.join("bin/sh")).expect("readlink"), Path::new("busybox"));
        let ls = fs::metadata(dest.join("bin/ls")).expect("stat");
        assert_eq!(ls.ino(), fs::metadata(dest.join("bin/busybox")).expect("stat").ino());
        assert_eq!(fs::read_link(dest.join("bin/sh2")).expect("readlink"), Path::new("busybox"));
        assert_eq!(fs::read(dest.join("deep/implicit/parent")).expect("read"), b"x");
        assert_eq!(fs::metadata(dest.join("deep")).expect("stat").mode() & 0o7777, 0o755);
        if is_root() {
            assert_eq!((hello.uid(), hello.gid()), (1234, 4321));
            assert_eq!((etc.uid(), etc.gid()), (1234, 4321));
        }
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let tmp = TempDir::new();
        let lower = tar_bytes(&[
            E::Dir("a", 0o755),
            E::File("a/1", b"1", 0o644),
            E::File("a/2", b"2", 0o644),
            E::Dir("b", 0o755),
            E::File("b/keep", b"k", 0o644),
            E::File("b/drop", b"d", 0o644),
            E::Dir("b/dropdir", 0o755),
            E::File("b/dropdir/x", b"x", 0o644),
            E::Dir("c/old", 0o755),
            E::File("c/old/deep", b"deep", 0o644),
            E::File("c/gone", b"g", 0o644),
            E::Dir("d", 0o755),
            E::File("d/f", b"f", 0o644),
            E::Symlink("s", "/nonexistent"),
        ]);
        let upper = tar_bytes(&[
            // This layer's own entry before the marker must survive it.
            E::File("a/new", b"new", 0o644),
            E::File("a/.wh..wh..opq", b"", 0o644),
            E::File("b/.wh.drop", b"", 0o644),
            E::File("b/.wh.dropdir", b"", 0o644),
            E::File("b/.wh.never-existed", b"", 0o644),
            E::File("nodir/.wh.x", b"", 0o644),
            E::File("c/old/fresh", b"fresh", 0o644),
            E::File("c/.wh..wh..opq", b"", 0o644),
            // Whiteout after a same-layer file hides only lower layers: the file stays.
            E::File("b/mine", b"m", 0o644),
            E::File("b/.wh.mine", b"", 0o644),
            // Replacements: a file over a directory, a directory over a symlink.
            E::File("d", b"now a file", 0o644),
            E::Dir("s", 0o700),
            E::File("s/y", b"y", 0o644),
        ]);
        let layout = single(&tmp, &[(TAR, lower), (TAR_GZ, gzip(&upper))]);
        let dest = tmp.sub("rootfs");
        unpack(&layout, "t", &dest).expect("unpack");
        let names = |dir: &str| {
            let mut v: Vec<String> = fs::read_dir(dest.join(dir))
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names("a"), ["new"]);
        assert_eq!(names("b"), ["keep", "mine"]);
        assert_eq!(names("c"), ["old"]);
        assert_eq!(names("c/old"), ["fresh"]);
        assert!(!dest.join("nodir").exists(), "a whiteout creates nothing");
        assert_eq!(fs::read(dest.join("d")).expect("read"), b"now a file");
        let s = fs::symlink_metadata(dest.join("s")).expect("stat");
        assert!(s.is_dir());
        assert_eq!(s.mode() & 0o7777, 0o700);
        assert_eq!(fs::read(dest.join("s/y")).expect("read"), b"y");
    }

    #[test]
    fn read_only_dirs_do_not_block_later_layers() {
        let tmp = TempDir::new();
        let lower =
            tar_bytes(&[E::Dir("ro", 0o555), E::Dir("ro/inner", 0o500), E::File("ro/old", b"o", 0o444)]);
        let upper = tar_bytes(&[E::File("ro/inner/new", b"n", 0o644), E::File("ro/.wh.old", b"", 0o644)]);
        let layout = single(&tmp, &[(TAR, lower), (TAR, upper)]);
        let dest = tmp.sub("rootfs");
        unpack(&layout, "t", &dest).expect("unpack");
        assert_eq!(fs::metadata(dest.join("ro")).expect("stat").mode() & 0o7777, 0o555);
        assert!(!dest.join("ro/old").exists());
        // Let the cleanup in; as root this is moot.
        fs::set_permissions(dest.join("ro"), fs::Permissions::from_mode(0o755)).expect("chmod");
        let inner = dest.join("ro/inner");
        assert_eq!(fs::metadata(&inner).expect("stat").mode() & 0o7777, 0o500);
        assert_eq!(fs::read(inner.join("new")).expect("read"), b"n");
        fs::set_permissions(&inner, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn root_opaque_marker_clears_lower_layers() {
        let tmp = TempDir::new();
        let lower = tar_bytes(&[E::File("old", b"o", 0o644), E::Dir("olddir", 0o755)]);
        let upper = tar_bytes(&[E::File("new", b"n", 0o644), E::File(".wh..wh..opq", b"", 0o644)]);
        let layout = single(&tmp, &[(TAR, lower), (TAR, upper)]);
        let dest = tmp.sub("rootfs");
        unpack(&layout, "t", &dest).expect("unpack");
        let names: Vec<_> =
            fs::read_dir(&dest).expect("read_dir").map(|e| e.expect("e").file_name()).collect();
        assert_eq!(names, ["new"]);
    }

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

    #[test]
    fn oversized_index_and_missing_marker_are_rejected() {
        let tmp = TempDir::new();
        let layout = single(&tmp, &[]);
        fs::write(layout.join("index.json"), vec![b' '; MAX_JSON as usize + 1]).expect("write");
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");

        fs::remove_file(layout.join("oci-layout")).expect("rm");
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::NotALayout { .. }), "{err}");

        fs::write(layout.join("oci-layout"), b"{}").expect("write");
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::NotALayout { .. }), "{err}");
    }

    #[test]
    fn path_traversal_is_rejected() {
        for bad in ["../evil", "a/../../evil", "/abs-evil"] {
            let tmp = TempDir::new();
            let layout = single(&tmp, &[(TAR, tar_bytes(&[E::Dir("a", 0o755), E::RawFile(bad)]))]);
            let dest = tmp.sub("sub/rootfs");
            let err = unpack(&layout, "t", &dest).expect_err("must fail");
            assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{bad}: {err}");
            assert!(!tmp.0.join("sub/evil").exists() && !tmp.0.join("evil").exists());
        }
        for bad in ["../outside", "/etc/passwd"] {
            let tmp = TempDir::new();
            let layer = tar_bytes(&[E::RawHardlink("link", bad)]);
            let layout = single(&tmp, &[(TAR, layer)]);
            let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
            assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn symlinks_from_lower_layers_are_never_followed() {
        let tmp = TempDir::new();
        let outside = tmp.sub("outside");
        fs::write(outside.join("victim"), b"precious").expect("victim");
        let outside_str = outside.to_str().expect("utf8 path");
        let cases: Vec<(&str, Vec<E>)> = vec![
            ("a/x", vec![E::File("a/x", b"pwned", 0o644)]),
            ("b/x", vec![E::File("b/x", b"pwned", 0o644)]),
            ("a/.wh.victim", vec![E::File("a/.wh.victim", b"", 0o644)]),
            ("a/.wh..wh..opq", vec![E::File("a/.wh..wh..opq", b"", 0o644)]),
            ("hard link via a/", vec![E::Hardlink("h", "a/victim")]),
            ("dir via a/", vec![E::Dir("a/sub", 0o755)]),
        ];
        for (what, upper) in cases {
            let case = TempDir::new();
            let lower = tar_bytes(&[E::Symlink("a", outside_str), E::Symlink("b", "..")]);
            let layout = single(&case, &[(TAR, lower), (TAR, tar_bytes(&upper))]);
            let dest = case.sub("rootfs");
            let err = unpack(&layout, "t", &dest).expect_err(what);
            assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{what}: {err}");
            let mut left: Vec<_> =
                fs::read_dir(&outside).expect("ls").map(|e| e.expect("e").file_name()).collect();
            left.sort();
            assert_eq!(left, ["victim"], "{what}");
            assert_eq!(fs::read(outside.join("victim")).expect("read"), b"precious", "{what}");
            assert!(!case.0.join("x").exists(), "{what}");
        }

        // Same layer: symlink, then a file through it.
        let case = TempDir::new();
        let layer = tar_bytes(&[E::Symlink("a", outside_str), E::File("a/x", b"pwned", 0o644)]);
        let layout = single(&case, &[(TAR, layer)]);
        let err = unpack(&layout, "t", &case.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
        assert!(!outside.join("x").exists());

        // A file replacing the symlink itself is fine and writes inside dest.
        let case = TempDir::new();
        let lower = tar_bytes(&[E::Symlink("a", outside_str)]);
        let upper = tar_bytes(&[E::File("a", b"inside", 0o644)]);
        let layout = single(&case, &[(TAR, lower), (TAR, upper)]);
        let dest = case.sub("rootfs");
        unpack(&layout, "t", &dest).expect("unpack");
        assert_eq!(fs::read(dest.join("a")).expect("read"), b"inside");
        assert_eq!(fs::read(outside.join("victim")).expect("read"), b"precious");
    }

    #[test]
    fn tag_selection() {
        let tmp = TempDir::new();
        let l = LayoutBuilder::new(tmp.sub("layout"));
        let one = l.image(&[(TAR, tar_bytes(&[E::File("one", b"1", 0o644)]))], json!({"Cmd": ["one"]}));
        let two = l.image(&[(TAR, tar_bytes(&[E::File("two", b"2", 0o644)]))], json!({"Cmd": ["two"]}));
        l.index(vec![tagged(one.clone(), "v1"), tagged(two, "v2")]);
        let config = unpack(&l.dir, "v2", &tmp.sub("r1")).expect("unpack");
        assert_eq!(config.cmd, ["two"]);
        assert!(tmp.0.join("r1/two").exists());

        let err = unpack(&l.dir, "nope", &tmp.sub("r2")).expect_err("must fail");
        assert!(matches!(err, ImageError::UnknownTag { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("\"nope\"") && msg.contains("v1, v2"), "{msg}");
        let err = unpack(&l.dir, "", &tmp.sub("r3")).expect_err("must fail");
        assert!(matches!(err, ImageError::AmbiguousImage { count: 2, .. }), "{err}");

        // One manifest: taken when no tag is asked; an untagged one is also "latest".
        l.index(vec![tagged(one.clone(), "v1")]);
        assert_eq!(unpack(&l.dir, "", &tmp.sub("r4")).expect("unpack").cmd, ["one"]);
        assert!(unpack(&l.dir, "latest", &tmp.sub("r5")).is_err());
        l.index(vec![one]);
        assert_eq!(unpack(&l.dir, "latest", &tmp.sub("r6")).expect("unpack").cmd, ["one"]);
        let err = unpack(&l.dir, "v1", &tmp.sub("r7")).expect_err("must fail");
        assert!(err.to_string().contains("(none)"), "{err}");
    }

    #[test]
    fn nested_index_picks_linux_amd64() {
        let tmp = TempDir::new();
        let l = LayoutBuilder::new(tmp.sub("layout"));
        let arm = l.image(&[(TAR, tar_bytes(&[E::File("arm", b"", 0o644)]))], json!({"Cmd": ["arm"]}));
        let amd = l.image(&[(TAR, tar_bytes(&[E::File("amd", b"", 0o644)]))], json!({"Cmd": ["amd"]}));
        let mut arm = arm;
        arm["platform"] = json!({"architecture": "arm64", "os": "linux"});
        let mut amd = amd;
        amd["platform"] = json!({"architecture": "amd64", "os": "linux"});
        let nested = json!({"schemaVersion": 2, "manifests": [arm.clone(), amd]});
        let nested = l.json_blob("application/vnd.oci.image.index.v1+json", &nested);
        l.index(vec![tagged(nested, "multi")]);
        let dest = tmp.sub("rootfs");
        assert_eq!(unpack(&l.dir, "multi", &dest).expect("unpack").cmd, ["amd"]);
        assert!(dest.join("amd").exists() && !dest.join("arm").exists());

        let only_arm = json!({"schemaVersion": 2, "manifests": [arm]});
        let only_arm = l.json_blob("application/vnd.oci.image.index.v1+json", &only_arm);
        l.index(vec![tagged(only_arm, "multi")]);
        let err = unpack(&l.dir, "multi", &tmp.sub("r2")).expect_err("must fail");
        assert!(matches!(err, ImageError::NoMatchingPlatform { .. }), "{err}");
    }

    #[test]
    fn docker_media_types_and_zstd() {
        let tmp = TempDir::new();
        let layer = gzip(&tar_bytes(&[E::File("f", b"docker", 0o644)]));
        let layout = single(&tmp, &[(DOCKER_LAYER_GZIP, layer)]);
        let dest = tmp.sub("rootfs");
        unpack(&layout, "t", &dest).expect("unpack");
        assert_eq!(fs::read(dest.join("f")).expect("read"), b"docker");

        let tmp = TempDir::new();
        let layout = single(&tmp, &[("application/vnd.oci.image.layer.v1.tar+zstd", vec![1, 2, 3])]);
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::UnsupportedLayer { .. }), "{err}");
        assert!(err.to_string().contains("zstd"), "{err}");
    }

    #[test]
    fn destination_must_be_an_empty_dir() {
        let tmp = TempDir::new();
        let layout = single(&tmp, &[]);
        let dest = tmp.sub("rootfs");
        fs::write(dest.join("junk"), b"").expect("write");
        let err = unpack(&layout, "t", &dest).expect_err("must fail");
        assert!(matches!(err, ImageError::BadDestination { .. }), "{err}");
        let err = unpack(&layout, "t", &tmp.0.join("missing")).expect_err("must fail");
        assert!(matches!(err, ImageError::BadDestination { .. }), "{err}");
    }

    #[test]
    fn parse_reference_cases() {
        let ok = |s: &str| parse_reference(s).expect(s);
        assert_eq!(ok("dir"), (PathBuf::from("dir"), "latest".to_owned()));
        assert_eq!(ok("dir:v1"), (PathBuf::from("dir"), "v1".to_owned()));
        assert_eq!(ok("/a/b:c:d"), (PathBuf::from("/a/b:c"), "d".to_owned()));
        assert_eq!(ok("/a:b/c"), (PathBuf::from("/a:b/c"), "latest".to_owned()));
        assert_eq!(ok("./x:1.0"), (PathBuf::from("./x"), "1.0".to_owned()));
        for bad in ["", ":tag", "dir:"] {
            let err = parse_reference(bad).expect_err(bad);
            assert!(matches!(err, ImageError::InvalidReference { .. }), "{bad}: {err}");
        }
    }
}
