//! 2 MiB pages for the parts of a snapshot's memory that restored guests only read.
//!
//! A restored VM maps the memory file private, and each page its guest touches first costs a
//! nested page fault. Where the page cache holds a whole 2 MiB page of the file and the VMM
//! maps guest RAM 2 MiB aligned (as [`super::memory`] does), a read fault maps the whole 2 MiB
//! in the host and KVM follows with one 2 MiB nested entry: one fault instead of one per
//! 4 KiB page touched. A guest write inside such a chunk splits it back to 4 KiB pages (the
//! written page becomes private), so only chunks the working set shows read and never
//! written are joined.
//!
//! Linux (6.1 and later) joins a file's page cache pages into one 2 MiB page on request
//! (`MADV_COLLAPSE`) for tmpfs files; on other filesystems the request is refused and this
//! does nothing. The join changes the page cache that every restore shares, so it is done
//! once, by husk, when a working set is recorded; the pages stay shared by every VM.

use std::fs::File;
use std::path::Path;

use super::memory::{map_aligned, HUGE_PAGE};
use super::state::MemRegion;
use super::working_set::WorkingSet;
use super::{SnapshotError, MEMORY_FILE, STATE_FILE};

/// Fewest pages a chunk's guest must have read for joining it to pay: a 2 MiB page holds the
/// whole chunk in memory, holes included.
pub const MIN_READ_PAGES: u64 = 32;
/// Most chunks joined for one snapshot (128 MiB of page cache): the working set comes from a
/// VMM, so what it can make husk hold in memory is bounded.
pub const MAX_CHUNKS: usize = 64;

/// What joining did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Joined {
    /// Chunks now held as one 2 MiB page (or that already were).
    pub chunks: u32,
    /// Chunks the kernel did not join (no free 2 MiB page, or busy), left as they were.
    pub failed: u32,
    /// The memory file is not on tmpfs, whose pages are the only ones Linux joins.
    pub unsupported: bool,
}

/// Joins the read-only chunks of the snapshot in `dir` that `ws` names.
pub fn join_read_only(dir: &Path, ws: &WorkingSet) -> Result<Joined, SnapshotError> {
    let snap = super::file::read(&dir.join(STATE_FILE))?;
    let file = File::open(dir.join(MEMORY_FILE))
        .map_err(|source| SnapshotError::Io { what: "open memory file", source })?;
    Ok(join_chunks(&file, &snap.memory, &ws.read_only_chunks(MIN_READ_PAGES)))
}

/// Joins the chunks at guest addresses `chunks` of a memory file laid out as `regions`.
/// A chunk that does not lie whole and 2 MiB aligned in one region of the file is passed by.
pub(super) fn join_chunks(file: &File, regions: &[MemRegion], chunks: &[u64]) -> Joined {
    let mut done = Joined::default();
    if !on_tmpfs(file) {
        done.unsupported = true;
        return done;
    }
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let huge = HUGE_PAGE as u64;
    for &chunk in chunks.iter().take(MAX_CHUNKS) {
        let Some(offset) = file_offset(regions, chunk) else { continue };
        if offset.checked_add(huge).is_none_or(|end| end > file_len) {
            continue;
        }
        match join(file, offset) {
            Ok(()) => done.chunks += 1,
            Err(e) => {
                tracing::debug!("memory file chunk at {offset:#x} not joined: {e}");
                done.failed += 1;
            }
        }
    }
    done
}

/// Whether `file` is on tmpfs, the one filesystem whose pages Linux joins on request.
fn on_tmpfs(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `st` is a writable statfs the kernel fills; the fd is open for the call.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    // SAFETY: filled by the successful call just made.
    rc == 0 && unsafe { st.assume_init() }.f_type == TMPFS_MAGIC
}

/// Where guest address `chunk` lies in the file, when its whole 2 MiB does so aligned.
pub(super) fn file_offset(regions: &[MemRegion], chunk: u64) -> Option<u64> {
    let huge = HUGE_PAGE as u64;
    let r = regions.iter().find(|r| chunk >= r.guest_addr && chunk - r.guest_addr < r.len)?;
    let within = chunk - r.guest_addr;
    let aligned = [chunk, r.guest_addr, r.file_offset].iter().all(|a| a.is_multiple_of(huge));
    (aligned && within.checked_add(huge)? <= r.len).then_some(r.file_offset + within)
}

/// Joins the 2 MiB of `file` at `offset` in the page cache.
fn join(file: &File, offset: u64) -> std::io::Result<()> {
    let addr = map_aligned(Some(file), offset, HUGE_PAGE, libc::PROT_READ, libc::MAP_SHARED)?;
    // SAFETY: `addr` is the 2 MiB read-only mapping of file data made just above. Reading a
    // byte first gives the mapping a page table: Linux 6.1 joins an untouched chunk but then
    // reports EINVAL for it. The advice reads and rearranges the page cache behind the
    // mapping without changing a byte, and the mapping is given back right after.
    let rc = unsafe {
        std::ptr::read_volatile(addr);
        libc::madvise(addr.cast(), HUGE_PAGE, libc::MADV_COLLAPSE)
    };
    let result = if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
    // SAFETY: the mapping made above, used by nothing else.
    unsafe { libc::munmap(addr.cast(), HUGE_PAGE) };
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn region(guest_addr: u64, len: u64, file_offset: u64) -> MemRegion {
        MemRegion { guest_addr, len, file_offset }
    }

    #[test]
    fn only_whole_aligned_chunks_of_one_region_have_an_offset() {
        let regions = [region(0, 6 * MIB, 0), region(8 * MIB, 4 * MIB, 6 * MIB)];
        assert_eq!(file_offset(&regions, 2 * MIB), Some(2 * MIB));
        assert_eq!(file_offset(&regions, 8 * MIB), Some(6 * MIB));
        assert_eq!(file_offset(&regions, 10 * MIB), Some(8 * MIB));
        // Past the end of RAM, in the gap, unaligned, or running past its region.
        assert_eq!(file_offset(&regions, 12 * MIB), None);
        assert_eq!(file_offset(&regions, 6 * MIB), None);
        assert_eq!(file_offset(&regions, MIB), None);
        assert_eq!(file_offset(&[region(0, 3 * MIB, 0)], 2 * MIB), None);
        // A region whose file offset is not aligned cannot be mapped whole.
        assert_eq!(file_offset(&[region(0, 4 * MIB, 4096)], 0), None);
    }

    /// Whether this process maps a 2 MiB page of shared memory at `addr`.
    fn pmd_mapped(addr: usize) -> bool {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_vma = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, end)) = range.split_once('-') {
                    if let (Ok(s), Ok(e)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
                    {
                        in_vma = (s..e).contains(&addr);
                        continue;
                    }
                }
            }
            if in_vma && line.starts_with("ShmemPmdMapped:") {
                return !line.contains(" 0 kB");
            }
        }
        false
    }

    #[test]
    fn a_chunk_on_tmpfs_becomes_one_huge_page_with_the_same_bytes() {
        let dir = Path::new("/dev/shm");
        if !dir.is_dir() {
            eprintln!("skipped: no /dev/shm (tmpfs) to hold a test file");
            return;
        }
        let path = dir.join(format!("husk-huge-{}", std::process::id()));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        if !on_tmpfs(&file) {
            let _ = std::fs::remove_file(&path);
            eprintln!("skipped: /dev/shm is not tmpfs here");
            return;
        }
        file.set_len(6 * MIB).unwrap();
        // Chunk 0 has data in a few pages and holes between, chunk 1 in one page.
        for page in [0u64, 7, 300, 511, 600] {
            file.write_all_at(format!("page {page}").as_bytes(), page * 4096).unwrap();
        }
        let regions = [region(0, 6 * MIB, 0)];
        let joined = join_chunks(&file, &regions, &[0, 2 * MIB, 5 * MIB, 64 * MIB]);
        assert!(!joined.unsupported, "/dev/shm is tmpfs");
        if joined.chunks == 0 {
            eprintln!("this kernel joins no tmpfs pages (before 6.1, or THP off): checked only that nothing changed");
        } else {
            // The two whole chunks inside the file; the unaligned one and the one past RAM
            // are passed by.
            assert_eq!((joined.chunks, joined.failed), (2, 0));
            let addr = map_aligned(Some(&file), 0, HUGE_PAGE, libc::PROT_READ, libc::MAP_SHARED).unwrap();
            // SAFETY: the 2 MiB read-only mapping just made; a volatile read faults it in.
            unsafe { std::ptr::read_volatile(addr.add(7 * 4096)) };
            assert!(pmd_mapped(addr as usize), "the joined chunk maps as one 2 MiB page");
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(addr.cast(), HUGE_PAGE) };
        }
        for page in [0u64, 7, 300, 511, 600] {
            let want = format!("page {page}");
            let mut got = vec![0u8; want.len()];
            file.read_exact_at(&mut got, page * 4096).unwrap();
            assert_eq!(got, want.as_bytes());
        }
        let mut hole = [1u8; 16];
        file.read_exact_at(&mut hole, 100 * 4096).unwrap();
        assert_eq!(hole, [0u8; 16]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_file_off_tmpfs_is_left_alone() {
        let path = std::env::temp_dir().join(format!("husk-huge-{}", std::process::id()));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(4 * MIB).unwrap();
        file.write_all_at(b"data", 0).unwrap();
        let tmpfs = on_tmpfs(&file);
        let joined = join_chunks(&file, &[region(0, 4 * MIB, 0)], &[0]);
        let _ = std::fs::remove_file(&path);
        if tmpfs {
            eprintln!("skipped: the temporary directory is tmpfs here");
            return;
        }
        assert_eq!(joined, Joined { chunks: 0, failed: 0, unsupported: true });
    }
}
