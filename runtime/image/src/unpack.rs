//! Unpacking an image's layers into a rootfs directory.
//!
//! Layers are untrusted input:
//! - Entries with absolute paths or `..` components are rejected, and nothing is ever written, linked or
//!   deleted through a symlink: every parent component under `dest` must be a real directory. Unlike
//!   containerd this does not resolve symlinks within the rootfs; layer diffs taken from an overlay
//!   upper directory never need that.
//! - PAX records are framed by their length prefix here, not by the tar crate, which splits them on
//!   newlines; an entry the two readings disagree on is refused (see [`pax`]).
//! - Layers are hashed as they are extracted, so a tampered layer is reported after its entries were
//!   written: on any error the caller must throw `dest` away.
//!
//! Choices:
//! - Whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`) hide only what lower layers put there.
//! - Permissions (with setuid/setgid/sticky bits), mtimes and symlinks are preserved. Ownership (the
//!   numeric uid/gid, never the user names) only when running as root; otherwise the caller owns all.
//!   Directory modes and mtimes are applied after the last layer, so a read-only directory does not block
//!   later entries and creating children does not clobber the mtimes. Since setuid-root binaries land
//!   on the host, `dest` should sit in a directory that only root can traverse.
//! - Character/block devices and FIFOs are created only when running as root (see [`special`]): the
//!   guest reaches the rootfs through virtio-fs, where a device node is the guest's own device by
//!   major:minor. Otherwise they are skipped.
//! - Extended attributes from PAX records are applied, `security.capability` strictly and the rest
//!   best-effort (see [`xattrs`]). The rootfs root entry's own metadata is ignored so `dest` keeps the
//!   mode the caller gave it.
//! - A hard link's target must exist when the link is applied (from this layer or a lower one, and not
//!   removed by a whiteout since) and must not be a directory.
//!
//! Decompression bombs are capped per layer by [`UnpackLimits`]: the uncompressed bytes (counted as they
//! are decompressed, so reading stops at the cap), the number of entries, and the headers the tar reader
//! buffers for one entry. With diff_ids, each layer's uncompressed stream is hashed as it is read and
//! checked once the layer is done.

mod pax;
mod special;
mod stream;
mod xattrs;

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, FileTimes, OpenOptions};
use std::io::{self, Read};
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use oci_spec::image::Descriptor;
use tracing::{debug, warn};

use crate::blob::{open_blob, BlobReader};
use crate::config::{read_config, ImageConfig};
use crate::error::{io_err, ImageError, LAYER_BYTES, LAYER_ENTRIES};
use crate::layout::find_manifest;
use stream::{Compression, HeaderTap, LayerStream};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Caps against decompression bombs, per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Most bytes a layer's uncompressed tar stream may have.
    pub max_layer_bytes: u64,
    /// Most tar entries a layer may have, whiteouts and skipped ones included.
    pub max_layer_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits { max_layer_bytes: 16 << 30, max_layer_entries: 1_000_000 }
    }
}

/// What an unpack went through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub layers: usize,
    /// Tar entries, whiteouts and skipped ones included.
    pub entries: u64,
    /// Uncompressed tar bytes read.
    pub bytes: u64,
}

/// Unpacks the image tagged `tag` (index.json manifest whose annotation org.opencontainers.image.ref.name
/// == tag; if the index has exactly one manifest and no tag was asked for, use it; if a manifest entry is
/// itself an image index, pick linux/amd64) into `dest` (must exist, empty dir), applying layers in order.
///
/// "No tag" is `tag == ""`. As `parse_reference` turns a bare "DIR" into "DIR:latest", a layout whose only
/// manifest carries no ref.name at all (`skopeo copy ... oci:DIR`) is also taken for "latest".
///
/// Layers are capped by the default [`UnpackLimits`]. Diff_ids are not checked: the layout's index anchors
/// every blob by digest already.
pub fn unpack(layout: &Path, tag: &str, dest: &Path) -> Result<ImageConfig, ImageError> {
    unpack_with_limits(layout, tag, dest, &UnpackLimits::default())
}

/// [`unpack`] with explicit caps.
pub fn unpack_with_limits(
    layout: &Path,
    tag: &str,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<ImageConfig, ImageError> {
    let dest = check_destination(dest)?;
    let manifest = find_manifest(layout, tag)?;
    // Read the config before touching dest so a bad config fails fast.
    let config = read_config(layout, manifest.config())?;
    apply_layers(layout, manifest.layers(), None, dest, limits)?;
    Ok(config)
}

/// Applies `layers` in order into the existing empty directory `dest`, reading each blob from
/// `blobs_root/blobs/sha256/<hex>` (size and sha256 verified) and, when `diff_ids` is Some (the image
/// config's rootfs.diff_ids, one per layer, "sha256:<hex>"), also checking each layer's uncompressed tar
/// stream hashes to its diff_id.
///
/// On any error `dest` holds a partial rootfs (maybe with a tampered layer's entries) and must be thrown
/// away.
pub fn unpack_layers(
    blobs_root: &Path,
    layers: &[Descriptor],
    diff_ids: Option<&[String]>,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, ImageError> {
    let dest = check_destination(dest)?;
    if let Some(diff_ids) = diff_ids {
        check_diff_ids(layers, diff_ids)?;
    }
    apply_layers(blobs_root, layers, diff_ids, dest, limits)
}

fn apply_layers(
    blobs_root: &Path,
    layers: &[Descriptor],
    diff_ids: Option<&[String]>,
    dest: PathBuf,
    limits: &UnpackLimits,
) -> Result<UnpackStats, ImageError> {
    let mut unpacker = Unpacker { dest, as_root: is_root(), dirs: BTreeMap::new() };
    let mut stats = UnpackStats::default();
    for (i, desc) in layers.iter().enumerate() {
        let diff_id = diff_ids.and_then(|ids| ids.get(i)).map(String::as_str);
        unpacker.apply_layer(blobs_root, desc, diff_id, limits, &mut stats)?;
    }
    unpacker.finish()?;
    Ok(stats)
}

/// Checked before anything is written: one well-formed sha256 diff_id per layer.
fn check_diff_ids(layers: &[Descriptor], diff_ids: &[String]) -> Result<(), ImageError> {
    if diff_ids.len() != layers.len() {
        return Err(ImageError::DiffIdCountMismatch { layers: layers.len(), diff_ids: diff_ids.len() });
    }
    for id in diff_ids {
        let hex = id.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ImageError::UnsupportedDigest(id.clone()));
        }
    }
    Ok(())
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

/// A header's mtime as a time to set. Headers reach 2^64 - 1 seconds (base-256), past what
/// `SystemTime` holds, where adding would panic: such times become the latest one it holds, as
/// [`special`] does for device nodes (the kernel clamps to what the file system stores).
fn mtime(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.min(i64::MAX as u64))
}

/// The entry's numeric uid and gid.
fn owner(header: &tar::Header) -> io::Result<(u32, u32)> {
    let id = |v: u64| u32::try_from(v).map_err(|_| io::Error::other(format!("id {v} out of range")));
    Ok((id(header.uid()?)?, id(header.gid()?)?))
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

    fn broken(&self, source: io::Error) -> ImageError {
        ImageError::Archive { layer: self.digest.clone(), source }
    }

    fn too_large(&self, what: &'static str, limit: u64) -> ImageError {
        ImageError::LayerTooLarge { layer: self.digest.clone(), what, limit }
    }
}

/// What streaming one layer found.
struct Streamed {
    entries: u64,
    bytes: u64,
    diff_id: Option<String>,
}

impl Unpacker {
    fn apply_layer(
        &mut self,
        blobs_root: &Path,
        desc: &Descriptor,
        diff_id: Option<&str>,
        limits: &UnpackLimits,
        stats: &mut UnpackStats,
    ) -> Result<(), ImageError> {
        let compression = Compression::of(desc)?;
        let mut layer = Layer { digest: desc.digest().to_string(), touched: HashSet::new() };
        debug!(layer = %layer.digest, size = desc.size(), "applying layer");
        let mut blob = open_blob(blobs_root, desc)?;
        let streamed = self.stream_layer(&mut layer, compression, &mut blob, diff_id.is_some(), limits);
        // A tampered blob usually breaks the decompressor or the tar stream first: the digest mismatch is
        // the better explanation, so it wins. This reads the rest of the compressed blob, never inflates it.
        blob.finish()?;
        let streamed = streamed?;
        if let (Some(expected), Some(actual)) = (diff_id, streamed.diff_id) {
            if actual != expected {
                return Err(ImageError::DiffIdMismatch {
                    layer: layer.digest,
                    expected: expected.to_owned(),
                    actual,
                });
            }
        }
        stats.layers += 1;
        stats.entries += streamed.entries;
        stats.bytes += streamed.bytes;
        Ok(())
    }

    fn stream_layer(
        &mut self,
        layer: &mut Layer,
        compression: Compression,
        blob: &mut BlobReader,
        hash: bool,
        limits: &UnpackLimits,
    ) -> Result<Streamed, ImageError> {
        let decoder = compression.decoder(blob).map_err(|e| layer.broken(e))?;
        let mut stream = LayerStream::new(decoder, limits.max_layer_bytes, hash);
        let extracted = self
            .extract(layer, &mut stream, limits.max_layer_entries)
            .and_then(|entries| stream.drain().map(|()| entries).map_err(|e| layer.broken(e)));
        // Whatever error the cap caused inside the tar reader, the cap is the explanation.
        if stream.over_limit() {
            return Err(layer.too_large(LAYER_BYTES, limits.max_layer_bytes));
        }
        Ok(Streamed { entries: extracted?, bytes: stream.consumed(), diff_id: stream.diff_id() })
    }

    /// Applies the layer's entries; returns how many there were.
    fn extract<R: Read>(
        &mut self,
        layer: &mut Layer,
        stream: R,
        max_entries: u64,
    ) -> Result<u64, ImageError> {
        let tap = HeaderTap::default();
        let mut archive = tar::Archive::new(tap.reader(stream));
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        archive.set_preserve_ownerships(self.as_root);
        archive.set_unpack_xattrs(false);
        let mut entries = archive.entries().map_err(|e| layer.broken(e))?;
        let mut count = 0u64;
        loop {
            // The previous entry's data is consumed, so all the reader reads now is the next one's headers.
            tap.arm();
            let next = entries.next();
            tap.disarm();
            let Some(entry) = next else { return Ok(count) };
            count += 1;
            if count > max_entries {
                return Err(layer.too_large(LAYER_ENTRIES, max_entries));
            }
            let mut entry = entry.map_err(|e| layer.broken(e))?;
            self.apply_entry(layer, &mut entry, &tap)?;
            // Data of entries that were skipped (or only partly read) is read here, outside the header cap.
            io::copy(&mut entry, &mut io::sink()).map_err(|e| layer.broken(e))?;
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        layer: &mut Layer,
        entry: &mut tar::Entry<R>,
        tap: &HeaderTap,
    ) -> Result<(), ImageError> {
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        // Checked for every entry: its path, link target, size or owner may come from the records.
        let records = pax::entry_records(layer, &name, entry, tap)?;
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
            T::Char | T::Block | T::Fifo if self.as_root => {}
            T::Char | T::Block | T::Fifo => {
                debug!(entry = %name, "skipping device node or FIFO: not running as root");
                return Ok(());
            }
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => return Ok(()),
            other => {
                warn!(entry = %name, kind = ?other, "skipping tar entry of unknown type");
                return Ok(());
            }
        }

        let xattrs = xattrs::read(layer, &name, &records)?;
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

        // Attributes go on last: chown (owner, then mode, is tar's order too) clears security.capability.
        if is_dir {
            self.unpack_dir(layer, &name, entry, &rel, &target)?;
        } else if kind == T::Link {
            self.unpack_hard_link(layer, &name, entry, &target)?;
        } else if matches!(kind, T::Char | T::Block | T::Fifo) {
            if !special::make_node(layer, &name, entry.header(), &target)? {
                return Ok(());
            }
        } else {
            // Files are created with O_EXCL (we removed any old one) and symlinks are stored verbatim;
            // their targets are never followed here. The full path is passed: `unpack_in` would also
            // strip a leading '/', silently skip '..' and follow symlinks inside dest.
            let unpacked = entry.unpack(&target).map_err(layer.failed(&name))?;
            if let tar::Unpacked::File(file) = unpacked {
                return xattrs::apply(layer, &name, &xattrs, xattrs::Target::File(&file));
            }
        }
        xattrs::apply(layer, &name, &xattrs, xattrs::Target::Path(&target))
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
            let (uid, gid) = owner(header).map_err(failed)?;
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

/// Whether a layer's media type is one the unpacker reads (checked before a pull downloads it).
pub(crate) fn layer_compression(desc: &Descriptor) -> Result<(), ImageError> {
    Compression::of(desc).map(drop)
}

#[cfg(test)]
mod tests;
