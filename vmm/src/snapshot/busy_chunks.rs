//! Private 2 MiB pages for the chunks of a snapshot's memory that restored guests touch most.
//!
//! After the written pages are copied ahead ([`super::working_set`]), each page a restored
//! guest touches still costs one nested page fault: KVM maps guest memory 4 KiB at a time
//! wherever the VMM's mapping is made of 4 KiB pages, which a private file mapping that the
//! guest writes always is. The working set puts most of those faults in a few 2 MiB chunks
//! (the guest kernel's data, its page tables and the pages it hands out next). Copying such a
//! chunk whole into one anonymous 2 MiB page before the vCPUs run lets KVM map it with one
//! nested entry: one fault for the chunk instead of one per page.
//!
//! The price is memory: each chunk is 2 MiB private to the VM, where only its written pages
//! were before. So only chunks the guest wrote in and touched much are copied, by default
//! [`DEFAULT_CHUNKS`] of them at most (the VMM's `--private-chunks` sets the number, up to
//! [`MAX_CHUNKS`]; 0 copies none), and no more than the host has free 2 MiB blocks for
//! ([`free_huge_pages`]). A chunk that cannot be copied (a short read) stays mapped from the
//! file as it was.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryRegion};

use super::huge_pages::file_offset;
use super::memory::{map_aligned, HUGE_PAGE};
use super::state::MemRegion;
use super::SnapshotError;
use crate::memory::GuestMem;

/// Lowest score ([`super::working_set::WorkingSet::busy_written_chunks`], about the nested
/// faults the chunk costs) for a copy to pay. A copy costs about two passes over 2 MiB (the
/// kernel zeroes the new page, then the file's bytes are read in), which in the nested test
/// host took as long as about 25 faults (on bare metal, where a fault costs far less, an
/// estimated hundred or so).
pub const MIN_SCORE: u64 = 64;
/// Chunks copied per VM at most unless told otherwise (12 MiB of private memory). In the
/// working sets measured, the sixth best chunk still saved about a hundred faults.
pub const DEFAULT_CHUNKS: usize = 6;
/// Most chunks any VM copies (64 MiB).
pub const MAX_CHUNKS: usize = 32;

const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
const BUDDYINFO: &str = "/proc/buddyinfo";
/// 2 MiB pages left free for the rest of the host: copies take only what is beyond these.
const FREE_RESERVE: u64 = 4;
/// The page allocator's order of a 2 MiB block (4 KiB base pages).
const HUGE_ORDER: usize = 9;

/// Whether this host gives anonymous memory 2 MiB pages where a program asks (`always` or
/// `madvise`); without them a copy would only cost memory.
fn host_has_huge_pages() -> bool {
    std::fs::read_to_string(THP_ENABLED).is_ok_and(|s| !s.contains("[never]"))
}

/// How many chunks a VM asked for `max` may copy now: none without transparent huge pages,
/// at most [`MAX_CHUNKS`], and no more than the host's free 2 MiB blocks beyond
/// [`FREE_RESERVE`] ([`free_huge_pages`]; unknown counts as none).
pub fn budget(max: usize) -> usize {
    if max == 0 || !host_has_huge_pages() {
        return 0;
    }
    budget_with(max, free_huge_pages())
}

fn budget_with(max: usize, free: Option<u64>) -> usize {
    let room = free.unwrap_or(0).saturating_sub(FREE_RESERVE);
    max.min(MAX_CHUNKS).min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// How many free 2 MiB blocks the host's page allocator holds now (/proc/buddyinfo, all zones
/// but DMA); None if unknown. On a host whose memory is fragmented, a 2 MiB page that is not
/// free would be made by compacting memory in the page fault itself (MADV_HUGEPAGE under the
/// usual `defrag` of `madvise`), a stall of unbounded length in the middle of a restore. So no
/// more chunks are copied than there are free blocks (less [`FREE_RESERVE`]).
fn free_huge_pages() -> Option<u64> {
    parse_buddyinfo(&std::fs::read_to_string(BUDDYINFO).ok()?)
}

/// Free 2 MiB blocks in buddyinfo's text: each line is `Node N, zone NAME` and the free block
/// counts of orders 0, 1, ...; a block of order 9 + k holds 2^k of them.
fn parse_buddyinfo(text: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut zones = 0;
    for line in text.lines() {
        let Some((_, rest)) = line.split_once(" zone ") else { continue };
        let mut fields = rest.split_whitespace();
        // User memory never comes from the 16 MiB DMA zone.
        if fields.next()? == "DMA" {
            continue;
        }
        for (order, count) in fields.enumerate() {
            let count: u64 = count.parse().ok()?;
            if order >= HUGE_ORDER {
                let each = 1u64.checked_shl(u32::try_from(order - HUGE_ORDER).ok()?)?;
                total = total.saturating_add(count.saturating_mul(each));
            }
        }
        zones += 1;
    }
    (zones > 0).then_some(total)
}

/// Copies the chunks at guest addresses `chunks` of `mem` (mapped from `file`, laid out as
/// `regions`) into private 2 MiB pages, and returns the addresses of those it copied. Must run
/// before any vCPU or device touches guest memory: the chunk's old pages are replaced. The
/// one error is guest RAM left with a hole, which the VM cannot run with.
pub fn copy_in(
    mem: &GuestMem,
    file: &File,
    regions: &[MemRegion],
    chunks: &[u64],
) -> Result<Vec<u64>, SnapshotError> {
    let mut done = Vec::new();
    for &chunk in chunks.iter().take(MAX_CHUNKS) {
        match copy_chunk(mem, file, regions, chunk) {
            Ok(()) => done.push(chunk),
            Err(Failed::Skipped(e)) => tracing::debug!("chunk at {chunk:#x} left mapped from the file: {e}"),
            Err(Failed::Hole(source)) => {
                return Err(SnapshotError::Io { what: "map a chunk of the memory file back", source })
            }
        }
    }
    Ok(done)
}

enum Failed {
    /// Left as it was.
    Skipped(std::io::Error),
    /// The chunk is no longer mapped.
    Hole(std::io::Error),
}

impl From<std::io::Error> for Failed {
    fn from(e: std::io::Error) -> Self {
        Self::Skipped(e)
    }
}

fn copy_chunk(mem: &GuestMem, file: &File, regions: &[MemRegion], chunk: u64) -> Result<(), Failed> {
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
    let offset = file_offset(regions, chunk).ok_or_else(|| invalid("not a whole aligned chunk of RAM"))?;
    let region = mem.find_region(GuestAddress(chunk)).ok_or_else(|| invalid("not guest RAM"))?;
    let within = chunk - region.start_addr().0;
    if within.checked_add(HUGE_PAGE as u64).is_none_or(|end| end > region.len()) {
        return Err(invalid("runs past its region").into());
    }
    // In bounds of the region's mapping, checked just above.
    let target = region.as_ptr().wrapping_add(within as usize);
    if !(target as usize).is_multiple_of(HUGE_PAGE) {
        return Err(invalid("guest RAM is not mapped 2 MiB aligned").into());
    }
    let file_offset = libc::off_t::try_from(offset).map_err(|_| invalid("file offset"))?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let copy = map_aligned(None, 0, HUGE_PAGE, prot, libc::MAP_PRIVATE)?;
    // SAFETY: `copy` is the fresh 2 MiB anonymous mapping made just above; nothing else uses
    // it. The advice is asked before its first touch, so the fault that follows allocates one
    // 2 MiB page; the slice is the mapping's whole length and lives only for the read.
    let read = unsafe {
        libc::madvise(copy.cast(), HUGE_PAGE, libc::MADV_HUGEPAGE);
        file.read_exact_at(std::slice::from_raw_parts_mut(copy, HUGE_PAGE), offset)
    };
    if let Err(e) = read {
        // SAFETY: the mapping made above, not handed out.
        unsafe { libc::munmap(copy.cast(), HUGE_PAGE) };
        return Err(e.into());
    }
    // SAFETY: both ranges are 2 MiB, aligned, and owned here: `copy` was made above and
    // `target` is guest RAM that no vCPU or device has touched yet (this runs before they
    // start). Moving the page over it replaces the file's mapping with the same bytes; the
    // whole page table entry moves, so it stays one 2 MiB page.
    let moved = unsafe {
        libc::mremap(
            copy.cast(),
            HUGE_PAGE,
            HUGE_PAGE,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target.cast::<libc::c_void>(),
        )
    };
    if moved == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        // Linux unmaps the target before it moves: map the file back there so guest RAM has
        // no hole, then give the copy back.
        // SAFETY: `target` is the chunk's own place in guest RAM, mapped again as it was (the
        // same file, offset, protection and flags as `super::memory::map_regions`).
        unsafe {
            let back = libc::mmap(
                target.cast(),
                HUGE_PAGE,
                prot,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED,
                std::os::fd::AsRawFd::as_raw_fd(file),
                file_offset,
            );
            libc::munmap(copy.cast(), HUGE_PAGE);
            if back == libc::MAP_FAILED {
                return Err(Failed::Hole(std::io::Error::other(format!(
                    "moving the copy failed ({e}), then: {}",
                    std::io::Error::last_os_error()
                ))));
            }
        }
        return Err(e.into());
    }
    Ok(())
}

#[cfg(test)]
mod buddyinfo_tests {
    use super::{budget_with, parse_buddyinfo, FREE_RESERVE, MAX_CHUNKS};

    #[test]
    fn the_budget_is_the_free_blocks_beyond_the_reserve() {
        assert_eq!(budget_with(6, Some(100)), 6);
        assert_eq!(budget_with(100, Some(1000)), MAX_CHUNKS);
        assert_eq!(budget_with(6, Some(FREE_RESERVE + 2)), 2);
        assert_eq!(budget_with(6, Some(FREE_RESERVE)), 0);
        assert_eq!(budget_with(6, Some(0)), 0);
        assert_eq!(budget_with(6, None), 0);
        assert_eq!(budget_with(0, Some(100)), 0);
    }

    #[test]
    fn free_2mib_blocks_are_counted_from_order_9_up_outside_the_dma_zone() {
        let text = "Node 0, zone      DMA      1      1      0      1      2      1      1      0      1      1      3 \n\
                    Node 0, zone    DMA32      5      4      3      2      1      0      0      1      2      3      4 \n\
                    Node 0, zone   Normal    100     50     20     10      5      2      1      0      0      1      2 \n";
        // DMA32: 3 + 4 * 2; Normal: 1 + 2 * 2.
        assert_eq!(parse_buddyinfo(text), Some(11 + 5));
        let none_free = "Node 0, zone   Normal    9 9 9 9 9 9 9 9 9 0 0\n";
        assert_eq!(parse_buddyinfo(none_free), Some(0));
        // A kernel with fewer orders (no order 9) has none.
        assert_eq!(parse_buddyinfo("Node 0, zone   Normal    1 2 3\n"), Some(0));
    }

    #[test]
    fn unreadable_text_is_unknown() {
        assert_eq!(parse_buddyinfo(""), None);
        assert_eq!(parse_buddyinfo("no zones here\n"), None);
        assert_eq!(parse_buddyinfo("Node 0, zone   Normal    1 x 3\n"), None);
        assert_eq!(parse_buddyinfo("Node 0, zone      DMA    1 1 1 1 1 1 1 1 1 1 1\n"), None);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::Bytes;

    use super::*;
    use crate::snapshot::memory::map_regions;

    const MIB: u64 = 1 << 20;

    /// KiB of anonymous 2 MiB pages this process maps in the mapping that holds `addr`.
    fn anon_huge_kib(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_vma = false;
        for line in smaps.lines() {
            let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
            if let Some((s, e)) = range.and_then(|(s, e)| {
                Some((usize::from_str_radix(s, 16).ok()?, usize::from_str_radix(e, 16).ok()?))
            }) {
                in_vma = (s..e).contains(&addr);
            } else if in_vma && line.starts_with("AnonHugePages:") {
                return line.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        0
    }

    #[test]
    fn a_copied_chunk_has_the_files_bytes_and_keeps_writes_private() {
        let path = std::env::temp_dir().join(format!("husk-busy-{}", std::process::id()));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(8 * MIB).unwrap();
        // Chunk 1 (2-4 MiB) has data in a few pages and holes between.
        for page in [512u64, 513, 700, 1023] {
            file.write_all_at(format!("page {page}").as_bytes(), page * 4096).unwrap();
        }
        let regions = [MemRegion { guest_addr: 0, len: 8 * MIB, file_offset: 0 }];
        let mem = map_regions(file.try_clone().unwrap(), &regions).unwrap();
        // The second chunk, one past RAM, one unaligned: only the first is copied.
        let done = copy_in(&mem, &file, &regions, &[2 * MIB, 8 * MIB, 3 * MIB]).unwrap();
        assert_eq!(done, vec![2 * MIB]);
        for page in [512u64, 513, 700, 1023] {
            let want = format!("page {page}");
            let mut got = vec![0u8; want.len()];
            mem.read_slice(&mut got, GuestAddress(page * 4096)).unwrap();
            assert_eq!(got, want.as_bytes());
        }
        let mut hole = [1u8; 8];
        mem.read_slice(&mut hole, GuestAddress(600 * 4096)).unwrap();
        assert_eq!(hole, [0; 8]);
        // The guest's writes there stay its own, as with the file's mapping.
        mem.write_slice(b"guest", GuestAddress(513 * 4096)).unwrap();
        mem.write_slice(b"guest", GuestAddress(5 * MIB)).unwrap();
        let mut f = [0u8; 5];
        file.read_exact_at(&mut f, 513 * 4096).unwrap();
        assert_eq!(&f, b"page ");
        file.read_exact_at(&mut f, 5 * MIB).unwrap();
        assert_eq!(f, [0; 5]);
        let host = mem.get_host_address(GuestAddress(2 * MIB)).unwrap() as usize;
        if host_has_huge_pages() {
            assert_eq!(anon_huge_kib(host), 2048, "the chunk is one 2 MiB page");
        } else {
            eprintln!("this host gives no 2 MiB pages: checked only the bytes");
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn at_most_max_chunks_are_copied() {
        let path = std::env::temp_dir().join(format!("husk-busy-max-{}", std::process::id()));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let len = (MAX_CHUNKS as u64 + 2) * 2 * MIB;
        file.set_len(len).unwrap();
        let regions = [MemRegion { guest_addr: 0, len, file_offset: 0 }];
        let mem = map_regions(file.try_clone().unwrap(), &regions).unwrap();
        let all: Vec<u64> = (0..MAX_CHUNKS as u64 + 2).map(|c| c * 2 * MIB).collect();
        assert_eq!(copy_in(&mem, &file, &regions, &all).unwrap().len(), MAX_CHUNKS);
        let _ = std::fs::remove_file(&path);
    }
}
