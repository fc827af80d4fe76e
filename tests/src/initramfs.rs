//! Builds the L1 initramfs: host files at their own absolute paths, plus what they need to run.
//!
//! Files keep their host paths so a job script is identical whether it runs directly on the
//! host or inside L1. To make that hold for dynamically linked programs, the host's symlinks on
//! the way to a file are reproduced too (on merged-/usr Debian `/lib` is a link to `usr/lib`, and
//! the paths `ldd` prints go through it), and shared libraries come along with executables.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{BufWriter, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use husk_rootfs_builder::CpioWriter;

use crate::error::TestHostError;

/// More symlink hops than this on one path means a loop.
const MAX_SYMLINK_HOPS: usize = 40;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir(u32),
    /// Contents read from the host path when the archive is written.
    HostFile {
        host: PathBuf,
        mode: u32,
    },
    Data {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink(String),
    CharDev {
        major: u32,
        minor: u32,
        mode: u32,
    },
}

impl Node {
    fn describe(&self) -> String {
        match self {
            Node::Dir(_) => "a directory".into(),
            Node::HostFile { host, .. } => format!("host file {}", host.display()),
            Node::Data { .. } => "generated file".into(),
            Node::Symlink(t) => format!("symlink to {t}"),
            Node::CharDev { .. } => "device node".into(),
        }
    }
}

/// An initramfs under construction. Paths are archive paths without the leading `/`.
#[derive(Debug, Default)]
pub struct Initramfs {
    nodes: BTreeMap<String, Node>,
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Mount points, `/root`, and the device nodes the kernel needs before devtmpfs is mounted.
    pub fn with_base_layout() -> Result<Self, TestHostError> {
        let mut fs = Self::new();
        for d in ["dev", "proc", "sys", "run", "root", "mnt"] {
            fs.dir(d, 0o755)?;
        }
        fs.dir("tmp", 0o1777)?;
        fs.insert("dev/console", Node::CharDev { major: 5, minor: 1, mode: 0o600 })?;
        fs.insert("dev/null", Node::CharDev { major: 1, minor: 3, mode: 0o666 })?;
        Ok(fs)
    }

    pub fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(path.trim_start_matches('/'))
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), TestHostError> {
        self.insert(path, Node::Dir(mode))
    }

    /// A generated file (init script, job script).
    pub fn data(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Result<(), TestHostError> {
        self.insert(path, Node::Data { data: data.into(), mode })
    }

    /// Host file `host` at archive path `path` (contents read when the archive is written).
    pub fn host_file_at(&mut self, path: &str, host: &Path, mode: u32) -> Result<(), TestHostError> {
        self.insert(path, Node::HostFile { host: host.to_path_buf(), mode })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), TestHostError> {
        self.insert(path, Node::Symlink(target.to_string()))
    }

    /// Adds host path `path` (absolute) at the same path: files, directories recursively, and
    /// symlinks together with what they point to. Dynamically linked ELF files bring their
    /// shared libraries and ELF interpreter.
    pub fn add_host_path(&mut self, path: &Path) -> Result<(), TestHostError> {
        self.add_host_path_inner(path, true)
    }

    /// Adds the program `name` found in `PATH`, with its libraries; returns where it is.
    pub fn add_binary(&mut self, name: &str) -> Result<PathBuf, TestHostError> {
        let path = which(name)?;
        self.add_host_path(&path)?;
        Ok(path)
    }

    /// Installs busybox and a link for each applet whose path is still free, so that files the
    /// job brought along (say a real `ls`) win over busybox's versions. Call it last.
    /// Returns busybox's path in the archive (symlink-free, for `#!` lines).
    pub fn add_busybox(&mut self) -> Result<PathBuf, TestHostError> {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .map_or_else(|| which("busybox"), Ok)?;
        self.add_host_path(&busybox)?;
        let real = fs::canonicalize(&busybox).map_err(TestHostError::io(format!("resolving {busybox:?}")))?;
        let target = real.to_string_lossy().into_owned();
        let out = Command::new(&busybox)
            .arg("--list-full")
            .output()
            .map_err(TestHostError::io(format!("running {} --list-full", busybox.display())))?;
        if !out.status.success() {
            return Err(TestHostError::Io {
                what: format!("{} --list-full", busybox.display()),
                source: std::io::Error::other(format!("{}", out.status)),
            });
        }
        for rel in String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()) {
            let applet = Path::new("/").join(rel);
            let (Some(parent), Some(name)) = (applet.parent(), applet.file_name()) else { continue };
            // Put the link where the host's directory really is (`/bin` -> `/usr/bin`), since
            // the archive reproduces the host's directory symlinks.
            let dir = if parent.exists() { self.add_host_dir_only(parent)? } else { parent.to_path_buf() };
            let link = archive_path(&dir.join(name));
            if !self.contains(&link) {
                self.symlink(&link, &target)?;
            }
        }
        Ok(real)
    }

    /// Writes the archive; returns its size in bytes.
    pub fn write(&self, out: &Path) -> Result<u64, TestHostError> {
        let file = fs::File::create(out).map_err(TestHostError::io(format!("creating {}", out.display())))?;
        let mut w = CpioWriter::new(BufWriter::with_capacity(1 << 20, file));
        for (path, node) in &self.nodes {
            match node {
                Node::Dir(mode) => w.dir(path, *mode)?,
                Node::HostFile { host, mode } => {
                    let data =
                        fs::read(host).map_err(TestHostError::io(format!("reading {}", host.display())))?;
                    w.file(path, *mode, &data)?;
                }
                Node::Data { data, mode } => w.file(path, *mode, data)?,
                Node::Symlink(target) => w.symlink(path, target)?,
                Node::CharDev { major, minor, mode } => w.char_dev(path, *mode, *major, *minor)?,
            }
        }
        let file = w.finish()?.into_inner().map_err(|e| TestHostError::Io {
            what: format!("flushing {}", out.display()),
            source: e.into_error(),
        })?;
        let len = file.metadata().map_err(TestHostError::io(format!("stat {}", out.display())))?.len();
        Ok(len)
    }

    /// Adds directory `path` (and the symlinks leading to it) without its contents; returns
    /// its symlink-free path.
    fn add_host_dir_only(&mut self, path: &Path) -> Result<PathBuf, TestHostError> {
        let real = self.resolve_host(path)?;
        let archive = archive_path(&real);
        if !archive.is_empty() && !self.contains(&archive) {
            self.dir(&archive, 0o755)?;
        }
        Ok(real)
    }

    fn add_host_path_inner(&mut self, path: &Path, with_libs: bool) -> Result<(), TestHostError> {
        if !path.is_absolute() {
            return Err(TestHostError::NotAbsolute(path.to_path_buf()));
        }
        let real = self.resolve_host(path)?;
        let meta =
            fs::symlink_metadata(&real).map_err(TestHostError::io(format!("stat {}", real.display())))?;
        let archive = archive_path(&real);
        if archive.is_empty() {
            return Err(TestHostError::Conflict("".into(), "the root".into(), "a host path".into()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            self.dir(&archive, mode)?;
            let entries =
                fs::read_dir(&real).map_err(TestHostError::io(format!("listing {}", real.display())))?;
            for entry in entries {
                let entry = entry.map_err(TestHostError::io(format!("listing {}", real.display())))?;
                self.add_host_path_inner(&entry.path(), with_libs)?;
            }
        } else if meta.is_file() {
            self.host_file_at(&archive, &real, mode)?;
            if with_libs && is_dynamic_elf(&real) {
                for lib in shared_libs(&real)? {
                    self.add_host_path_inner(&lib, false)?;
                }
            }
        }
        // Sockets, fifos and device nodes have no meaning in L1: skip them.
        Ok(())
    }

    /// Follows `path` component by component like the kernel would, recording every symlink met
    /// on the way; returns the symlink-free host path it ends at.
    fn resolve_host(&mut self, path: &Path) -> Result<PathBuf, TestHostError> {
        let mut pending: Vec<PathBuf> = Vec::new(); // remaining components, reversed
        push_components(&mut pending, path);
        let mut real = PathBuf::from("/");
        let mut hops = 0;
        while let Some(part) = pending.pop() {
            if part.as_os_str() == ".." {
                real.pop();
                continue;
            }
            let candidate = real.join(&part);
            let meta = match fs::symlink_metadata(&candidate) {
                Ok(m) => m,
                Err(e) => {
                    return Err(TestHostError::Io {
                        what: format!("stat {}", candidate.display()),
                        source: e,
                    })
                }
            };
            if !meta.file_type().is_symlink() {
                real = candidate;
                continue;
            }
            hops += 1;
            let target = fs::read_link(&candidate)
                .map_err(TestHostError::io(format!("readlink {}", candidate.display())))?;
            if hops > MAX_SYMLINK_HOPS {
                return Err(TestHostError::Io {
                    what: format!("resolving {}", path.display()),
                    source: std::io::Error::other("too many levels of symbolic links"),
                });
            }
            self.symlink(&archive_path(&candidate), &target.to_string_lossy())?;
            if target.is_absolute() {
                real = PathBuf::from("/");
            }
            push_components(&mut pending, &target);
        }
        Ok(real)
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<(), TestHostError> {
        let path = path.trim_start_matches('/');
        let mut parent = String::new();
        for part in Path::new(path).parent().into_iter().flat_map(Path::components) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(&part.as_os_str().to_string_lossy());
            match self.nodes.get(&parent) {
                None => {
                    self.nodes.insert(parent.clone(), Node::Dir(0o755));
                }
                Some(Node::Dir(_)) => {}
                Some(other) => {
                    return Err(TestHostError::Conflict(parent, other.describe(), "a directory".into()))
                }
            }
        }
        match self.nodes.get(path) {
            None => {
                self.nodes.insert(path.to_string(), node);
            }
            // A directory met again (as a parent first, or twice): keep the explicit mode.
            Some(Node::Dir(_)) if matches!(node, Node::Dir(_)) => {
                self.nodes.insert(path.to_string(), node);
            }
            Some(old) if *old == node => {}
            Some(old) => {
                return Err(TestHostError::Conflict(path.to_string(), old.describe(), node.describe()))
            }
        }
        Ok(())
    }
}

/// Pushes the normal and `..` components of `path` onto a reversed work stack.
fn push_components(stack: &mut Vec<PathBuf>, path: &Path) {
    let parts: Vec<PathBuf> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(PathBuf::from(p)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect();
    stack.extend(parts.into_iter().rev());
}

fn archive_path(p: &Path) -> String {
    p.to_string_lossy().trim_start_matches('/').to_string()
}

/// Finds `name` in `PATH` like a shell would (an executable regular file).
pub fn which(name: &str) -> Result<PathBuf, TestHostError> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return if p.is_file() { Ok(p) } else { Err(TestHostError::NotInPath(name.into())) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .ok_or_else(|| TestHostError::NotInPath(name.into()))
}

/// Whether `path` is an ELF file with a dynamic section (needs `ldd`); static binaries and
/// non-ELF files are not.
fn is_dynamic_elf(path: &Path) -> bool {
    const PT_DYNAMIC: u32 = 2;
    let Ok(mut f) = fs::File::open(path) else { return false };
    let mut hdr = [0u8; 64];
    if f.read_exact(&mut hdr).is_err() || &hdr[..4] != b"\x7fELF" || hdr[4] != 2 || hdr[5] != 1 {
        return false; // not a little-endian ELF64
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(hdr[0x20..0x28].try_into().unwrap_or_default()) as usize;
    let (phentsize, phnum) = (u16_at(&hdr, 0x36), u16_at(&hdr, 0x38));
    if phentsize < 4 || phnum == 0 {
        return false;
    }
    let mut phdrs = vec![0u8; phentsize * phnum];
    use std::io::{Seek, SeekFrom};
    if f.seek(SeekFrom::Start(phoff as u64)).is_err() || f.read_exact(&mut phdrs).is_err() {
        return false;
    }
    phdrs.chunks_exact(phentsize).any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_DYNAMIC)
}

/// The shared libraries and ELF interpreter `path` loads, as absolute host paths (from `ldd`).
fn shared_libs(path: &Path) -> Result<Vec<PathBuf>, TestHostError> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .map_err(TestHostError::io(format!("running ldd {}", path.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd exits 1 for "not a dynamic executable"; nothing to add then.
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(TestHostError::Ldd { path: path.into(), msg: format!("{}: {err}", out.status) });
    }
    parse_ldd(&text).map_err(|msg| TestHostError::Ldd { path: path.into(), msg })
}

/// Parses `ldd` output: `libz.so.1 => /lib/.../libz.so.1 (0x..)` and `/lib64/ld-linux... (0x..)`;
/// the vDSO has no path and is skipped.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!("{} not found", name.trim()));
                }
                rest
            }
            None => line,
        };
        let path = target.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(OsStr::from_bytes(path.as_bytes())));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_lines() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 (0x2)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("libfoo.so => not found\n").is_err());
    }

    #[test]
    fn reproduces_host_symlinks_and_libs() {
        let Ok(sh) = which("sh") else { return };
        let mut fs = Initramfs::new();
        fs.add_host_path(&sh).unwrap();
        let real = std::fs::canonicalize(&sh).unwrap();
        assert!(fs.contains(&archive_path(&real)));
        // Every symlink on the way to the file is reproduced, so the original path works.
        if std::fs::symlink_metadata("/lib").is_ok_and(|m| m.file_type().is_symlink()) {
            assert!(fs.contains("lib"));
        }
        if is_dynamic_elf(&real) {
            assert!(fs.nodes.keys().any(|k| k.contains("libc.so")), "{:?}", fs.nodes.keys());
        }
    }

    #[test]
    fn rejects_conflicts() {
        let mut fs = Initramfs::new();
        fs.data("a/b", 0o644, "x").unwrap();
        assert!(matches!(fs.data("a/b/c", 0o644, "y"), Err(TestHostError::Conflict(..))));
        assert!(matches!(fs.symlink("a/b", "z"), Err(TestHostError::Conflict(..))));
        fs.dir("a", 0o700).unwrap();
    }
}
