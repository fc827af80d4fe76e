//! Unpacking an image's layers into a rootfs directory.
//!
//! Layers are untrusted input:
//! - Entries with absolute paths or `..` components are rejected, and nothing is ever written, linked or
//!   deleted through a symlink: every parent component under `dest` must be a real directory. Unlike
//!   containerd this does not resolve symlinks within the rootfs; layer diffs taken from an overlay
//!   upper directory never need that.
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
//! - Character/block devices and FIFOs are skipped, even as root: an image-supplied device node on the
//!   host filesystem (say a world-writable disk) would be a host hole, and the guest mounts its own /dev.
//! - Extended attributes (e.g. `security.capability`) are not applied, and the rootfs root entry's own
//!   metadata is ignored so `dest` keeps the mode the caller gave it.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, FileTimes, OpenOptions};
use std::io::{self, Read};
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use flate2::read::MultiGzDecoder;
use oci_spec::image::{Descriptor, MediaType};
use tracing::{debug, warn};

use crate::blob::open_blob;
use crate::config::{read_config, ImageConfig};
use crate::error::{io_err, ImageError};
use crate::layout::find_manifest;

const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_FOREIGN_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Unpacks the image tagged `tag` (index.json manifest whose annotation org.opencontainers.image.ref.name
/// == tag; if the index has exactly one manifest and no tag was asked for, use it; if a manifest entry is
/// itself an image index, pick linux/amd64) into `dest` (must exist, empty dir), applying layers in order.
///
/// "No tag" is `tag == ""`. As `parse_reference` turns a bare "DIR" into "DIR:latest", a layout whose only
/// manifest carries no ref.name at all (`skopeo copy ... oci:DIR`) is also taken for "latest".
pub fn unpack(layout: &Path, tag: &str, dest: &Path) -> Result<ImageConfig, ImageError> {
    let dest = check_destination(dest)?;
    let manifest = find_manifest(layout, tag)?;
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
    use std::os::unix::fs::MetadataExt;

    use serde_json::json;

    use super::*;
    use crate::testutil::{gzip, single, tagged, tar_bytes, LayoutBuilder, TempDir, E, TAR, TAR_GZ};

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
}
