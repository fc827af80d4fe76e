//! A minimal writer for the SVR4 `newc` cpio format (the one the Linux initramfs unpacker reads).

use std::collections::BTreeSet;
use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
/// newc stores sizes in eight hex digits.
const MAX_FILE_SIZE: u64 = u32::MAX as u64;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("archive path {0:?} is invalid: it must be relative, without `..`, NUL or empty parts")]
    BadPath(String),
    #[error("archive path {0:?} appears twice")]
    Duplicate(String),
    #[error("file {path:?} is {size} bytes; newc allows at most 4 GiB")]
    TooLarge { path: String, size: u64 },
    #[error("writing the archive: {0}")]
    Io(#[from] io::Error),
}

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Streams entries into a `newc` archive. Parent directories are not created implicitly;
/// [`crate::spec`] does that.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    seen: BTreeSet<String>,
}

impl<W: Write> std::fmt::Debug for CpioWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpioWriter")
            .field("written", &self.written)
            .field("entries", &self.seen.len())
            .finish_non_exhaustive()
    }
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out, written: 0, next_ino: 1, seen: BTreeSet::new() }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        self.entry(path, S_IFDIR | (mode & 0o7777), 2, 0, &[])
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        self.entry(path, S_IFREG | (mode & 0o7777), 1, 0, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.entry(path, S_IFLNK | 0o777, 1, 0, target.as_bytes())
    }

    /// A character device node (`/dev/console` must exist before devtmpfs is mounted).
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<(), CpioError> {
        let rdev = (major << 8) | minor;
        self.entry(path, S_IFCHR | (mode & 0o7777), 1, rdev, &[])
    }

    /// Whether `path` was already added.
    pub fn contains(&self, path: &str) -> bool {
        self.seen.contains(path)
    }

    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header(TRAILER, 0, 1, 0, 0, 0)?;
        self.pad()?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, rdev: u32, data: &[u8]) -> Result<(), CpioError> {
        validate_path(path)?;
        if !self.seen.insert(path.to_string()) {
            return Err(CpioError::Duplicate(path.to_string()));
        }
        let size = data.len() as u64;
        if size > MAX_FILE_SIZE {
            return Err(CpioError::TooLarge { path: path.to_string(), size });
        }
        self.header(path, mode, nlink, rdev, size as u32, self.next_ino)?;
        self.next_ino += 1;
        self.write(data)?;
        self.pad()
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: u32,
        size: u32,
        ino: u32,
    ) -> Result<(), CpioError> {
        let namesize = name.len() + 1;
        let rmajor = rdev >> 8;
        let rminor = rdev & 0xff;
        // Fields: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
        // namesize check.
        let hdr = format!(
            "{MAGIC}{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{rmajor:08x}{rminor:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, 0
        );
        self.write(hdr.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, data: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// newc aligns every header and every file body to 4 bytes.
    fn pad(&mut self) -> Result<(), CpioError> {
        let rem = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..rem])
    }
}

fn validate_path(path: &str) -> Result<(), CpioError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path.split('/').any(|p| p.is_empty() || p == ".." || p == ".");
    if bad {
        return Err(CpioError::BadPath(path.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(buf: &[u8], off: usize, idx: usize) -> u32 {
        let s = std::str::from_utf8(&buf[off + 6 + idx * 8..off + 14 + idx * 8]).unwrap();
        u32::from_str_radix(s, 16).unwrap()
    }

    #[test]
    fn file_entry_layout_is_newc() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("init", 0o755, b"hello").unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(&buf[..6], b"070701");
        assert_eq!(field(&buf, 0, 1), S_IFREG | 0o755);
        assert_eq!(field(&buf, 0, 6), 5); // filesize
        assert_eq!(field(&buf, 0, 11), 5); // namesize incl. NUL
                                           // Header 110 bytes + "init\0" = 115, padded to 116; then data.
        assert_eq!(&buf[116..121], b"hello");
        assert_eq!(buf.len() % 4, 0);
        let trailer = std::str::from_utf8(&buf[124 + 110..124 + 120]).unwrap();
        assert_eq!(trailer, TRAILER);
    }

    #[test]
    fn rejects_bad_and_duplicate_paths() {
        let mut w = CpioWriter::new(Vec::new());
        for p in ["", "/abs", "a/../b", "a//b", "./x"] {
            assert!(matches!(w.file(p, 0o644, b""), Err(CpioError::BadPath(_))), "{p}");
        }
        w.dir("bin", 0o755).unwrap();
        assert!(matches!(w.dir("bin", 0o755), Err(CpioError::Duplicate(_))));
    }

    #[test]
    fn char_dev_encodes_rdev() {
        let mut w = CpioWriter::new(Vec::new());
        w.char_dev("console", 0o600, 5, 1).unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(field(&buf, 0, 9), 5);
        assert_eq!(field(&buf, 0, 10), 1);
    }
}
