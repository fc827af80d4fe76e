//! The list of files an initramfs holds, and building the archive from it.
//!
//! A spec is a text file, one entry per line (`#` starts a comment):
//! ```text
//! file    <archive path> <host path> [octal mode]
//! dir     <archive path> [octal mode]
//! symlink <archive path> <target>
//! nod     <archive path> c <major> <minor> [octal mode]
//! ```
//! Parent directories are created as needed; a file's mode defaults to the host file's mode.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::cpio::{CpioError, CpioWriter};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    File { path: String, host: PathBuf, mode: Option<u32> },
    Dir { path: String, mode: u32 },
    Symlink { path: String, target: String },
    CharDev { path: String, major: u32, minor: u32, mode: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("spec line {line}: {msg}")]
    Parse { line: usize, msg: String },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Cpio(#[from] CpioError),
}

fn octal(s: &str, line: usize) -> Result<u32, SpecError> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| SpecError::Parse { line, msg: format!("bad mode {s:?} (octal, at most 7777)") })
}

fn number(s: &str, line: usize) -> Result<u32, SpecError> {
    s.parse::<u32>()
        .ok()
        .filter(|n| *n <= 255)
        .ok_or_else(|| SpecError::Parse { line, msg: format!("bad device number {s:?}") })
}

fn archive_path(p: &str) -> String {
    p.trim_start_matches('/').to_string()
}

/// Parses a spec; host paths that are relative are taken relative to `base`.
pub fn parse_spec(text: &str, base: &Path) -> Result<Vec<Entry>, SpecError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let f: Vec<&str> = content.split_whitespace().collect();
        let bad = |msg: &str| SpecError::Parse { line, msg: msg.to_string() };
        let entry = match f.as_slice() {
            ["file", path, host] | ["file", path, host, _] => Entry::File {
                path: archive_path(path),
                host: base.join(host),
                mode: f.get(3).map(|m| octal(m, line)).transpose()?,
            },
            ["dir", path] => Entry::Dir { path: archive_path(path), mode: 0o755 },
            ["dir", path, mode] => Entry::Dir { path: archive_path(path), mode: octal(mode, line)? },
            ["symlink", path, target] => {
                Entry::Symlink { path: archive_path(path), target: target.to_string() }
            }
            ["nod", path, "c", major, minor] | ["nod", path, "c", major, minor, _] => Entry::CharDev {
                path: archive_path(path),
                major: number(major, line)?,
                minor: number(minor, line)?,
                mode: f.get(5).map(|m| octal(m, line)).transpose()?.unwrap_or(0o600),
            },
            [kind, ..] => return Err(bad(&format!("unknown or malformed entry {kind:?}"))),
            [] => continue,
        };
        out.push(entry);
    }
    Ok(out)
}

fn ensure_parents<W: Write>(w: &mut CpioWriter<W>, path: &str) -> Result<(), CpioError> {
    let mut prefix = String::new();
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        if !w.contains(&prefix) {
            w.dir(&prefix, 0o755)?;
        }
    }
    Ok(())
}

/// Writes the archive for `entries` to `out`.
pub fn build_from_spec<W: Write>(entries: &[Entry], out: W) -> Result<W, SpecError> {
    let mut w = CpioWriter::new(out);
    for e in entries {
        match e {
            Entry::File { path, host, mode } => {
                ensure_parents(&mut w, path)?;
                let data = fs::read(host).map_err(|source| SpecError::Read { path: host.clone(), source })?;
                let mode = match mode {
                    Some(m) => *m,
                    None => fs::metadata(host)
                        .map_err(|source| SpecError::Read { path: host.clone(), source })?
                        .permissions()
                        .mode(),
                };
                w.file(path, mode, &data)?;
            }
            Entry::Dir { path, mode } => {
                ensure_parents(&mut w, path)?;
                if !w.contains(path) {
                    w.dir(path, *mode)?;
                }
            }
            Entry::Symlink { path, target } => {
                ensure_parents(&mut w, path)?;
                w.symlink(path, target)?;
            }
            Entry::CharDev { path, major, minor, mode } => {
                ensure_parents(&mut w, path)?;
                w.char_dev(path, *mode, *major, *minor)?;
            }
        }
    }
    Ok(w.finish()?)
}

/// The entries every husk guest initramfs starts with: mount points and `/dev/console`, which
/// the kernel opens for init's stdio before anything is mounted.
pub fn base_entries() -> Vec<Entry> {
    let dir = |p: &str| Entry::Dir { path: p.to_string(), mode: 0o755 };
    vec![
        dir("dev"),
        dir("proc"),
        dir("sys"),
        dir("run"),
        Entry::Dir { path: "tmp".into(), mode: 0o1777 },
        Entry::CharDev { path: "dev/console".into(), major: 5, minor: 1, mode: 0o600 },
        Entry::CharDev { path: "dev/null".into(), major: 1, minor: 3, mode: 0o666 },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        let spec =
            "# comment\nfile /init bin/init 755\ndir /mnt\nsymlink /bin/sh busybox\nnod /dev/tty c 5 0 666\n";
        let e = parse_spec(spec, Path::new("/b")).unwrap();
        assert_eq!(e[0], Entry::File { path: "init".into(), host: "/b/bin/init".into(), mode: Some(0o755) });
        assert_eq!(e[1], Entry::Dir { path: "mnt".into(), mode: 0o755 });
        assert_eq!(e[2], Entry::Symlink { path: "bin/sh".into(), target: "busybox".into() });
        assert_eq!(e[3], Entry::CharDev { path: "dev/tty".into(), major: 5, minor: 0, mode: 0o666 });
    }

    #[test]
    fn reports_line_of_bad_entry() {
        let err = parse_spec("dir /a\nfile only-one-arg\n", Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(parse_spec("dir /a 9999\n", Path::new("/")).is_err());
    }

    #[test]
    fn creates_parent_dirs_once() {
        let dir = std::env::temp_dir().join(format!("husk-spec-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("x"), b"data").unwrap();
        let entries = vec![
            Entry::File { path: "a/b/x".into(), host: dir.join("x"), mode: Some(0o644) },
            Entry::Symlink { path: "a/b/y".into(), target: "x".into() },
        ];
        let buf = build_from_spec(&entries, Vec::new()).unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert_eq!(text.matches("a/b\0").count(), 1);
        fs::remove_dir_all(dir).unwrap();
    }
}
