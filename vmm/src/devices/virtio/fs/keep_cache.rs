//! Keeping the guest's page cache of a file across opens while the file is unchanged.
//!
//! Under `cache=auto` the passthrough never sets `FOPEN_KEEP_CACHE`, so the guest kernel drops
//! a file's cached pages at every open: each `exec` of a binary on the share read it all again
//! over FUSE (a busybox applet cost ~150 ms in the test host's nested guest). An open of a file
//! whose version (inode, size, mtime, ctime) is the one the previous open saw keeps the cache;
//! any change, by the host or through the share, drops it at the next open, as before.
//! Forgetting a version only costs a re-read, so the map is bounded by clearing it.

use std::collections::HashMap;
use std::sync::Mutex;

use fuse_backend_rs::abi::fuse_abi::stat64;

/// Versions kept at most; past it the map starts over (every file is re-read once).
const MAX_VERSIONS: usize = 1 << 16;

/// What identifies the contents of a file without reading it. `ctime` changes with every write
/// and cannot be set from user space, so a rewrite that restores size and mtime still shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileVersion {
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileVersion {
    pub fn of(st: &stat64) -> Self {
        Self {
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// The version each FUSE inode had at its last open.
#[derive(Debug, Default)]
pub struct OpenVersions {
    seen: Mutex<HashMap<u64, FileVersion>>,
}

impl OpenVersions {
    /// Records `now` as `inode`'s version; true when it is the one the last open recorded, so
    /// what the guest cached since then is still the file's contents.
    pub fn unchanged(&self, inode: u64, now: FileVersion) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_VERSIONS && !seen.contains_key(&inode) {
            seen.clear();
        }
        seen.insert(inode, now) == Some(now)
    }

    /// The guest forgot `inode`; its number may be handed out again for another file.
    pub fn forget(&self, inode: u64) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(&inode);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(size: i64, mtime: i64, ctime: i64) -> FileVersion {
        FileVersion { ino: 7, size, mtime: (mtime, 0), ctime: (ctime, 0) }
    }

    #[test]
    fn only_an_unchanged_file_keeps_its_cache() {
        let o = OpenVersions::default();
        assert!(!o.unchanged(2, v(10, 1, 1)), "a first open has nothing cached to keep");
        assert!(o.unchanged(2, v(10, 1, 1)));
        assert!(!o.unchanged(2, v(10, 1, 2)), "rewritten in place: ctime moved");
        assert!(o.unchanged(2, v(10, 1, 2)));
        assert!(!o.unchanged(2, v(11, 3, 3)));
        o.forget(2);
        assert!(!o.unchanged(2, v(11, 3, 3)), "a forgotten inode starts over");
        assert!(!o.unchanged(3, v(11, 3, 3)), "per inode");
    }

    #[test]
    fn the_map_is_bounded() {
        let o = OpenVersions::default();
        for i in 0..(MAX_VERSIONS as u64 + 10) {
            o.unchanged(i, v(1, 1, 1));
        }
        assert!(o.seen.lock().unwrap().len() <= MAX_VERSIONS);
    }
}
