//! Resolving an image config's `User` to the uid and gid to run as, from the unpacked rootfs's /etc/passwd
//! and /etc/group.
//!
//! `User` is one of `""` (root), `name`, `uid`, `name:group`, `uid:gid`, `name:gid` or `uid:group`. All
//! digits is an id, anything else a name; ids must lie in 0..=2^31-1, as runc requires (`u32::MAX` is -1
//! to setresuid and chown: "leave unchanged"). As in Docker and runc, a numeric user or group need not
//! exist in the image's files, and supplementary groups are not part of the answer.
//!
//! The rootfs is untrusted:
//! - `etc`, `etc/passwd` and `etc/group` are opened relative to the rootfs directory without following
//!   symlinks: a symlinked one (say to the host's /etc/shadow, or `../../..`) is an error, never read.
//!   They must be a directory and regular files, and are read up to [`MAX_USER_DB`] bytes. A missing one
//!   holds no entries.
//! - Ids are never guessed: an entry whose uid or gid field is not a valid id matches nothing, and when
//!   that leaves the user or group asked for unresolved the error names the malformed line.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode};

use crate::error::{io_err, ImageError};

/// Largest /etc/passwd or /etc/group read from an image.
pub const MAX_USER_DB: u64 = 1 << 20;
/// Largest uid or gid accepted (runc's limit).
const MAX_ID: u32 = 0x7fff_ffff;

/// Resolves the image config's `User` field against the image unpacked at `rootfs`, returning
/// `(uid, gid)`.
///
/// Names are looked up in `rootfs/etc/passwd` and `rootfs/etc/group`; see the module doc for the rules.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32), ImageError> {
    if user.is_empty() {
        return Ok((0, 0)); // no User: root
    }
    let invalid = |reason| ImageError::InvalidUser { user: user.to_owned(), reason };
    let unknown = |reason| ImageError::UnknownUser { user: user.to_owned(), reason };
    let (name, group) = match user.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (user, None),
    };
    if name.is_empty() {
        return Err(invalid("no user before the ':'"));
    }
    match group {
        Some("") => return Err(invalid("no group after the ':'")),
        Some(g) if g.contains(':') => return Err(invalid("more than one ':'")),
        _ => {}
    }
    let name = Key::parse(name).ok_or_else(|| invalid("uid out of range (0-2147483647)"))?;
    let group =
        group.map(|g| Key::parse(g).ok_or_else(|| invalid("gid out of range (0-2147483647)"))).transpose()?;

    let (uid, primary_gid) = match name {
        // `uid:gid` and `uid:group` need nothing from /etc/passwd: the group gives the gid below.
        Key::Id(uid) if group.is_some() => (uid, 0),
        Key::Id(uid) => match lookup::<2>(rootfs, Db::Passwd, name, user)? {
            Ok([_, gid]) => (uid, gid),
            // What Docker and runc do: a numeric user without a passwd entry runs with gid 0. This is that
            // documented behaviour, not a stand-in for an id that did not parse (a malformed entry for this
            // uid is an error from `lookup`).
            Err(_) => (uid, 0),
        },
        Key::Name(_) => lookup::<2>(rootfs, Db::Passwd, name, user)?.map_err(unknown)?.into(),
    };
    let gid = match group {
        None => primary_gid,
        Some(Key::Id(gid)) => gid,
        Some(key @ Key::Name(_)) => {
            let [gid] = lookup::<1>(rootfs, Db::Group, key, user)?.map_err(unknown)?;
            gid
        }
    };
    Ok((uid, gid))
}

/// The home directory runc gives a process of `uid` whose environment has no `HOME`: the
/// first /etc/passwd entry for `uid`, or `/` when the rootfs has no /etc/passwd. None when
/// there is an /etc/passwd without such an entry (or with one whose directory is empty, not
/// absolute or not UTF-8), or one that cannot be read safely (a symlink, a FIFO, too large):
/// the runtime in the guest then looks for itself, with the container's view of the rootfs.
pub fn home_dir(rootfs: &Path, uid: u32) -> Option<String> {
    let text = match read_etc(rootfs, Db::Passwd.file()) {
        Ok(Some(text)) => text,
        Ok(None) => return Some("/".into()),
        Err(_) => return None,
    };
    for line in text.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b':').collect();
        if line.starts_with(b"#") || fields.len() < 6 || parse_id(fields[2]) != Some(uid) {
            continue;
        }
        let dir = std::str::from_utf8(fields[5]).ok()?;
        return dir.starts_with('/').then(|| dir.to_owned());
    }
    None
}

/// A user or group as the `User` field names it.
#[derive(Clone, Copy)]
enum Key<'a> {
    Id(u32),
    Name(&'a str),
}

impl<'a> Key<'a> {
    /// All digits is an id (None if out of range), anything else a name.
    fn parse(s: &'a str) -> Option<Key<'a>> {
        if s.bytes().all(|b| b.is_ascii_digit()) {
            parse_id(s.as_bytes()).map(Key::Id)
        } else {
            Some(Key::Name(s))
        }
    }

    fn describe(self, db: Db) -> String {
        match (self, db) {
            (Key::Id(id), Db::Passwd) => format!("uid {id}"),
            (Key::Id(id), Db::Group) => format!("gid {id}"),
            (Key::Name(name), Db::Passwd) => format!("user {name:?}"),
            (Key::Name(name), Db::Group) => format!("group {name:?}"),
        }
    }
}

/// Which file a lookup reads. Entries are `name:password:uid:gid:...` in passwd and
/// `name:password:gid:members` in group: the ids start at field 2 either way.
#[derive(Clone, Copy)]
enum Db {
    Passwd,
    Group,
}

impl Db {
    fn file(self) -> &'static str {
        match self {
            Db::Passwd => "passwd",
            Db::Group => "group",
        }
    }
}

/// A decimal id in 0..=[`MAX_ID`]: no sign, no spaces, nothing else.
fn parse_id(field: &[u8]) -> Option<u32> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse::<u32>().ok().filter(|&id| id <= MAX_ID)
}

/// Looks `key` up in `/etc/<db>` of `rootfs` and returns the `N` ids of its entry (passwd: uid, gid;
/// group: gid), or why there is none. A malformed entry for `key` with no good one after it is an error.
fn lookup<const N: usize>(
    rootfs: &Path,
    db: Db,
    key: Key<'_>,
    user: &str,
) -> Result<Result<[u32; N], String>, ImageError> {
    let shown = format!("/etc/{}", db.file());
    let Some(text) = read_etc(rootfs, db.file())? else {
        return Ok(Err(format!("{} not found: the image has no {shown}", key.describe(db))));
    };
    match find_entry::<N>(&text, key) {
        Ok(Some(ids)) => Ok(Ok(ids)),
        Ok(None) => Ok(Err(format!("{} not found in {shown}", key.describe(db)))),
        Err(line) => Err(ImageError::UnknownUser {
            user: user.to_owned(),
            reason: format!(
                "the entry for {} on line {line} of {shown} is malformed (ids must be decimal, 0-{MAX_ID})",
                key.describe(db)
            ),
        }),
    }
}

/// Finds the first well-formed entry for `key` (by name, or by the id in field 2) and returns its `N` ids
/// from field 2 on. An entry for `key` whose ids do not parse does not match; if no good entry follows,
/// the first such entry's line number is the error.
fn find_entry<const N: usize>(text: &[u8], key: Key<'_>) -> Result<Option<[u32; N]>, usize> {
    let mut malformed = None;
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let fields: Vec<&[u8]> = line.split(|&b| b == b':').collect();
        let id = |k: usize| fields.get(2 + k).and_then(|f| parse_id(f));
        let hit = match key {
            Key::Name(name) => fields[0] == name.as_bytes(),
            Key::Id(wanted) => id(0) == Some(wanted),
        };
        if !hit {
            continue;
        }
        let mut ids = [0; N];
        let mut ok = true;
        for (k, slot) in ids.iter_mut().enumerate() {
            match id(k) {
                Some(v) => *slot = v,
                None => ok = false,
            }
        }
        if ok {
            return Ok(Some(ids));
        }
        malformed.get_or_insert(i + 1);
    }
    malformed.map_or(Ok(None), Err)
}

/// Reads `rootfs/etc/<file>`, or None if there is no such file (or no `etc`), without following a symlink
/// anywhere under `rootfs`.
fn read_etc(rootfs: &Path, file: &str) -> Result<Option<Vec<u8>>, ImageError> {
    // The rootfs directory itself is the caller's, and trusted; nothing below it is.
    let root =
        OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(rootfs).map_err(io_err(rootfs))?;
    let etc_path = rootfs.join("etc");
    let Some(etc) = open_nofollow(root.as_fd(), "etc", OFlag::O_DIRECTORY, &etc_path)? else {
        return Ok(None);
    };
    let path = etc_path.join(file);
    // O_NONBLOCK: a FIFO must not hang us before fstat says it is not a regular file.
    let Some(fd) = open_nofollow(etc.as_fd(), file, OFlag::O_NONBLOCK, &path)? else {
        return Ok(None);
    };
    let file = File::from(fd);
    if !file.metadata().map_err(io_err(&path))?.is_file() {
        return Err(ImageError::UnsafeRootfsFile { path, reason: "is not a regular file" });
    }
    let mut buf = Vec::new();
    file.take(MAX_USER_DB + 1).read_to_end(&mut buf).map_err(io_err(&path))?;
    if buf.len() as u64 > MAX_USER_DB {
        return Err(ImageError::TooLarge { what: path.display().to_string(), limit: MAX_USER_DB });
    }
    Ok(Some(buf))
}

/// Opens `name` in `dir` read-only with `flags`, never following a symlink; None if it does not exist.
fn open_nofollow(
    dir: BorrowedFd<'_>,
    name: &str,
    flags: OFlag,
    path: &Path,
) -> Result<Option<OwnedFd>, ImageError> {
    let flags = flags | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match openat(Some(dir.as_raw_fd()), name, flags, Mode::empty()) {
        // SAFETY: openat just returned this descriptor, so it is open and owned by nothing else.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) })),
        Err(Errno::ENOENT) => Ok(None),
        // O_NOFOLLOW on a symlink gives ELOOP, or ENOTDIR along with O_DIRECTORY; so does a non-directory.
        Err(errno @ (Errno::ELOOP | Errno::ENOTDIR)) => {
            let unsafe_file = |reason| ImageError::UnsafeRootfsFile { path: path.to_owned(), reason };
            match fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => Err(unsafe_file("is a symlink")),
                Ok(_) if errno == Errno::ENOTDIR => Err(unsafe_file("is not a directory")),
                _ => Err(io_errno(path, errno)),
            }
        }
        Err(errno) => Err(io_errno(path, errno)),
    }
}

fn io_errno(path: &Path, errno: Errno) -> ImageError {
    ImageError::Io { path: PathBuf::from(path), source: io::Error::from(errno) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    use crate::testutil::TempDir;

    #[test]
    fn home_is_the_passwd_entrys_or_slash_without_a_passwd() {
        let t = TempDir::new();
        let root = t.0.as_path();
        assert_eq!(home_dir(root, 0).as_deref(), Some("/"), "no /etc at all");
        fs::create_dir_all(root.join("etc")).unwrap();
        assert_eq!(home_dir(root, 0).as_deref(), Some("/"), "no /etc/passwd");
        fs::write(root.join("etc/passwd"), PASSWD).unwrap();
        assert_eq!(home_dir(root, 0).as_deref(), Some("/root"));
        assert_eq!(home_dir(root, 1).as_deref(), Some("/usr/sbin"));
        assert_eq!(home_dir(root, 4242), None, "no entry: left to the runtime");
        fs::write(root.join("etc/passwd"), "# c\nx:x:0:0::relative:/bin/sh\n").unwrap();
        assert_eq!(home_dir(root, 0), None, "not absolute");
        fs::remove_file(root.join("etc/passwd")).unwrap();
        symlink("/etc/passwd", root.join("etc/passwd")).unwrap();
        assert_eq!(home_dir(root, 0), None, "a symlink is never followed on the host");
    }

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin

# a comment
alice:x:1000:1000:Alice:/home/alice:/bin/sh
bob:x:1001:100::/home/bob:/bin/sh
";
    const GROUP: &str = "\
root:x:0:
staff:x:50:alice,bob
users:x:100:
";

    /// A rootfs with `etc/passwd` and `etc/group` as given (None: no such file).
    fn rootfs(tmp: &TempDir, passwd: Option<&str>, group: Option<&str>) -> PathBuf {
        let root = tmp.sub("rootfs");
        let etc = tmp.sub("rootfs/etc");
        for (name, text) in [("passwd", passwd), ("group", group)] {
            if let Some(text) = text {
                fs::write(etc.join(name), text).expect("write");
            }
        }
        root
    }

    fn ok(root: &Path, user: &str) -> (u32, u32) {
        resolve_user(root, user).unwrap_or_else(|e| panic!("{user:?}: {e}"))
    }

    fn err(root: &Path, user: &str) -> ImageError {
        match resolve_user(root, user) {
            Ok(ids) => panic!("{user:?} resolved to {ids:?}, expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn names_and_numbers() {
        let tmp = TempDir::new();
        let root = rootfs(&tmp, Some(PASSWD), Some(GROUP));
        assert_eq!(ok(&root, ""), (0, 0));
        assert_eq!(ok(&root, "root"), (0, 0));
        assert_eq!(ok(&root, "alice"), (1000, 1000));
        assert_eq!(ok(&root, "bob"), (1001, 100));
        // A uid takes its primary group from passwd; one without an entry gets gid 0, as in Docker.
        assert_eq!(ok(&root, "1001"), (1001, 100));
        assert_eq!(ok(&root, "0"), (0, 0));
        assert_eq!(ok(&root, "4242"), (4242, 0));
        assert_eq!(ok(&root, "01000"), (1000, 1000));
        let e = err(&root, "carol");
        assert!(matches!(e, ImageError::UnknownUser { .. }), "{e}");
        assert!(e.to_string().contains("\"carol\" not found in /etc/passwd"), "{e}");
        // Names are names: "+1000" or "1e3" are not uid 1000.
        for user in ["+1000", "1e3", " 1000"] {
            assert!(matches!(err(&root, user), ImageError::UnknownUser { .. }), "{user}");
        }
    }

    #[test]
    fn user_and_group_pairs() {
        let tmp = TempDir::new();
        let root = rootfs(&tmp, Some(PASSWD), Some(GROUP));
        assert_eq!(ok(&root, "alice:staff"), (1000, 50));
        assert_eq!(ok(&root, "alice:7"), (1000, 7));
        assert_eq!(ok(&root, "1001:staff"), (1001, 50));
        assert_eq!(ok(&root, "4242:users"), (4242, 100));
        assert_eq!(ok(&root, "1000:50"), (1000, 50));
        assert_eq!(ok(&root, "4242:4243"), (4242, 4243));
        let e = err(&root, "alice:wheel");
        assert!(matches!(e, ImageError::UnknownUser { .. }), "{e}");
        assert!(e.to_string().contains("group \"wheel\" not found in /etc/group"), "{e}");
        assert!(matches!(err(&root, "carol:staff"), ImageError::UnknownUser { .. }));
        for bad in [":staff", "alice:", "a:b:c", "4294967295", "2147483648", "1000:4294967295", "99999999999"]
        {
            let e = err(&root, bad);
            assert!(matches!(e, ImageError::InvalidUser { .. }), "{bad}: {e}");
        }
        assert_eq!(ok(&root, "2147483647"), (2147483647, 0));
    }

    #[test]
    fn missing_files_hold_no_entries() {
        let tmp = TempDir::new();
        let root = tmp.sub("rootfs"); // no etc at all
        assert_eq!(ok(&root, ""), (0, 0));
        assert_eq!(ok(&root, "1000"), (1000, 0));
        assert_eq!(ok(&root, "1000:1000"), (1000, 1000));
        let e = err(&root, "alice");
        assert!(matches!(e, ImageError::UnknownUser { .. }), "{e}");
        assert!(e.to_string().contains("the image has no /etc/passwd"), "{e}");

        let tmp = TempDir::new();
        let root = rootfs(&tmp, Some(PASSWD), None); // etc/passwd but no etc/group
        assert_eq!(ok(&root, "alice"), (1000, 1000));
        assert_eq!(ok(&root, "alice:50"), (1000, 50));
        let e = err(&root, "alice:staff");
        assert!(e.to_string().contains("the image has no /etc/group"), "{e}");

        // A missing rootfs is the caller's mistake, reported as such.
        let gone = tmp.0.join("nope");
        assert!(matches!(resolve_user(&gone, "alice"), Err(ImageError::Io { .. })));
    }

    #[test]
    fn symlinked_etc_is_not_followed() {
        for target in ["ABSOLUTE", "../host", "../../../../../../.."] {
            let case = TempDir::new();
            // "Host" files with entries the image must not get to use.
            let host = case.sub("host");
            fs::write(host.join("passwd"), "alice:x:0:0::/:/bin/sh\nx:x:1000:0::/:/bin/sh\n").expect("write");
            fs::write(host.join("group"), "staff:x:0:\n").expect("write");
            let root = case.sub("rootfs");
            let target = if target == "ABSOLUTE" { host.clone() } else { PathBuf::from(target) };
            symlink(&target, root.join("etc")).expect("symlink");
            for user in ["alice", "1000", "0:staff"] {
                let e = err(&root, user);
                assert!(
                    matches!(&e, ImageError::UnsafeRootfsFile { reason: "is a symlink", .. }),
                    "{target:?} {user}: {e}"
                );
            }
            // Nothing needs reading for ids alone.
            assert_eq!(ok(&root, "1000:1000"), (1000, 1000));
        }
    }

    #[test]
    fn symlinked_passwd_and_group_are_not_followed() {
        let tmp = TempDir::new();
        let host = tmp.sub("host");
        fs::write(host.join("shadow"), "alice:x:0:0::/:/bin/sh\nstaff:x:0:\n").expect("write");
        let root = rootfs(&tmp, None, Some(GROUP));
        symlink(host.join("shadow"), root.join("etc/passwd")).expect("symlink");
        for user in ["alice", "1000", "alice:staff"] {
            let e = err(&root, user);
            assert!(matches!(&e, ImageError::UnsafeRootfsFile { reason: "is a symlink", .. }), "{user}: {e}");
            assert!(e.to_string().contains("etc/passwd"), "{e}");
        }
        assert_eq!(ok(&root, "1000:staff"), (1000, 50));

        let tmp = TempDir::new();
        let host = tmp.sub("host");
        fs::write(host.join("group"), "staff:x:0:\n").expect("write");
        let root = rootfs(&tmp, Some(PASSWD), None);
        symlink(host.join("group"), root.join("etc/group")).expect("symlink");
        let e = err(&root, "alice:staff");
        assert!(matches!(&e, ImageError::UnsafeRootfsFile { reason: "is a symlink", .. }), "{e}");
        assert_eq!(ok(&root, "alice"), (1000, 1000));

        // Dangling or relative links are refused too, never taken for a missing file.
        let tmp = TempDir::new();
        let root = rootfs(&tmp, None, None);
        symlink("nowhere", root.join("etc/passwd")).expect("symlink");
        assert!(matches!(err(&root, "alice"), ImageError::UnsafeRootfsFile { .. }));
        assert!(matches!(err(&root, "1000"), ImageError::UnsafeRootfsFile { .. }));
    }

    #[test]
    fn odd_file_types_are_refused() {
        let tmp = TempDir::new();
        let root = rootfs(&tmp, None, None);
        fs::create_dir(root.join("etc/passwd")).expect("mkdir");
        let e = err(&root, "alice");
        assert!(matches!(&e, ImageError::UnsafeRootfsFile { reason: "is not a regular file", .. }), "{e}");

        // A FIFO must not block the lookup.
        let tmp = TempDir::new();
        let root = rootfs(&tmp, None, None);
        nix::unistd::mkfifo(&root.join("etc/passwd"), Mode::from_bits_truncate(0o644)).expect("mkfifo");
        let e = err(&root, "alice");
        assert!(matches!(&e, ImageError::UnsafeRootfsFile { reason: "is not a regular file", .. }), "{e}");

        // etc itself a file.
        let tmp = TempDir::new();
        let root = tmp.sub("rootfs");
        fs::write(root.join("etc"), PASSWD).expect("write");
        let e = err(&root, "alice");
        assert!(matches!(&e, ImageError::UnsafeRootfsFile { reason: "is not a directory", .. }), "{e}");
    }

    #[test]
    fn malformed_ids_never_become_zero() {
        let tmp = TempDir::new();
        let passwd = "\
alice:x:abc:1000::/:/bin/sh
bob:x:1001:::/:/bin/sh
carol:x:1002
dave:x:-1:5::/:/bin/sh
erin:x:4294967295:0::/:/bin/sh
frank:x:1003:oops::/:/bin/sh
frank:x:1004:1004::/:/bin/sh
";
        let group = "staff:x:zz:\nusers:x:100:\n";
        let root = rootfs(&tmp, Some(passwd), Some(group));
        for (user, line) in [("alice", 1), ("bob", 2), ("carol", 3), ("dave", 4), ("erin", 5)] {
            let e = err(&root, user);
            assert!(matches!(e, ImageError::UnknownUser { .. }), "{user}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(&format!("line {line} of /etc/passwd is malformed")), "{user}: {msg}");
        }
        // A later good entry for the same name wins over a malformed one.
        assert_eq!(ok(&root, "frank"), (1004, 1004));
        // uid 1001 has an entry whose gid is empty: an error, not gid 0.
        let e = err(&root, "1001");
        assert!(e.to_string().contains("uid 1001 on line 2"), "{e}");
        // An unparsable uid field matches no uid: uid 0 is not found through "abc" or "-1".
        assert_eq!(ok(&root, "0"), (0, 0));
        // uid 1003's only entry has gid "oops": an error too.
        let e = err(&root, "1003");
        assert!(e.to_string().contains("uid 1003 on line 6"), "{e}");
        let e = err(&root, "1004:staff");
        assert!(e.to_string().contains("group \"staff\" on line 1 of /etc/group is malformed"), "{e}");
        assert_eq!(ok(&root, "1004:users"), (1004, 100));
    }

    #[test]
    fn oversized_files_are_refused() {
        let tmp = TempDir::new();
        let mut big = String::from(PASSWD);
        big.push_str(&"#".repeat(MAX_USER_DB as usize - big.len() - 1));
        big.push('\n');
        assert_eq!(big.len() as u64, MAX_USER_DB);
        let root = rootfs(&tmp, Some(&big), None);
        assert_eq!(ok(&root, "alice"), (1000, 1000), "exactly the limit is fine");

        big.push('#');
        fs::write(root.join("etc/passwd"), &big).expect("write");
        let e = err(&root, "alice");
        assert!(matches!(e, ImageError::TooLarge { limit: MAX_USER_DB, .. }), "{e}");
        assert!(e.to_string().contains("etc/passwd"), "{e}");
        assert!(matches!(err(&root, "1000"), ImageError::TooLarge { .. }));

        let tmp = TempDir::new();
        let root = rootfs(&tmp, Some(PASSWD), Some(&"x".repeat(MAX_USER_DB as usize + 1)));
        let e = err(&root, "alice:staff");
        assert!(e.to_string().contains("etc/group"), "{e}");
    }
}
