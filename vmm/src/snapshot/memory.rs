//! The memory file: guest RAM written raw (all-zero pages left as holes), and mapped back
//! `MAP_PRIVATE` so a restored VM reads pages from the page cache on first touch and its
//! writes stay its own (copy-on-write): siblings restored from one file share what they have
//! not written, and the file never changes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemory, GuestMemoryRegion, GuestRegionMmap};

use super::state::MemRegion;
use super::SnapshotError;
use crate::memory::{ram_ranges, GuestMem};

const PAGE: usize = 4096;

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}

/// The layout the memory file of a `memory_mib` VM must have: its RAM ranges back to back.
pub fn layout(memory_mib: u64) -> Result<Vec<MemRegion>, SnapshotError> {
    let ranges = ram_ranges(memory_mib).map_err(|e| SnapshotError::Mismatch(e.to_string()))?;
    let mut offset = 0u64;
    Ok(ranges
        .into_iter()
        .map(|(addr, len)| {
            let r = MemRegion { guest_addr: addr.0, len: len as u64, file_offset: offset };
            offset += len as u64;
            r
        })
        .collect())
}

/// Writes all of `mem` into `file` (which must be empty) and returns the layout. Must only be
/// called with every vCPU and device worker stopped: nothing may write guest memory meanwhile.
pub fn write(mem: &GuestMem, file: &File) -> Result<Vec<MemRegion>, SnapshotError> {
    let mut layout = Vec::new();
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        layout.push(MemRegion { guest_addr: region.start_addr().0, len: len as u64, file_offset: offset });
        // SAFETY: the region maps `len` bytes at `as_ptr()` for as long as `mem` lives; the VM
        // is paused, so no vCPU or device writes it while we read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
        let mut start = 0;
        while start < len {
            // Skip zero pages, then write the following run of non-zero pages in one call.
            while start < len && bytes[start..(start + PAGE).min(len)].iter().all(|&b| b == 0) {
                start += PAGE;
            }
            let mut end = start;
            while end < len && !bytes[end..(end + PAGE).min(len)].iter().all(|&b| b == 0) {
                end += PAGE;
            }
            let end = end.min(len);
            if end > start {
                file.write_all_at(&bytes[start..end], offset + start as u64)
                    .map_err(io("write memory file"))?;
            }
            start = end;
        }
        offset += len as u64;
    }
    file.set_len(offset).map_err(io("size memory file"))?;
    Ok(layout)
}

/// Maps the memory file as guest RAM after checking it has exactly the layout a
/// `memory_mib` VM needs.
pub fn map(file: File, regions: &[MemRegion], memory_mib: u64) -> Result<GuestMem, SnapshotError> {
    let want = layout(memory_mib)?;
    if regions != want.as_slice() {
        return Err(SnapshotError::Invalid(format!("memory layout {regions:?} is not {want:?}")));
    }
    let total: u64 = want.iter().map(|r| r.len).sum();
    let found = file.metadata().map_err(io("stat memory file"))?.len();
    if found < total {
        return Err(SnapshotError::Truncated { expected: total, found });
    }
    if found > total {
        return Err(SnapshotError::Mismatch(format!("memory file holds {found} bytes, the VM has {total}")));
    }
    map_regions(file, &want)
}

/// Maps `regions` of the memory file private, as guest RAM (the layout already checked).
///
/// Each region starts on a 2 MiB boundary of the VMM's address space, as it does in guest
/// physical memory and in the file, so where the page cache holds a 2 MiB page (see
/// [`super::huge_pages`]) the host maps it whole and KVM maps it with one nested entry.
/// These mappings are never unmapped: guest RAM lives as long as the VMM process.
pub(super) fn map_regions(file: File, regions: &[MemRegion]) -> Result<GuestMem, SnapshotError> {
    let file = Arc::new(file);
    let mut mapped = Vec::new();
    for r in regions {
        let len = usize::try_from(r.len).map_err(|_| SnapshotError::Invalid("region size".into()))?;
        // Private: the guest's writes never reach the file; NORESERVE: no swap accounted for
        // pages that are never written.
        let (prot, flags) = (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_NORESERVE);
        let addr =
            map_aligned(Some(&file), r.file_offset, len, prot, flags).map_err(io("map memory file"))?;
        // SAFETY: `addr..addr + len` is a mapping made just above that is never unmapped, so
        // it outlives the region.
        let region = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(addr) }
            .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
            .with_mmap_prot(prot)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| SnapshotError::Io {
                what: "map memory file",
                source: std::io::Error::other(e.to_string()),
            })?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
            .ok_or_else(|| SnapshotError::Invalid("memory region overflows".into()))?;
        mapped.push(region);
    }
    GuestMem::from_regions(mapped).map_err(|e| SnapshotError::Invalid(format!("memory regions: {e}")))
}

/// The size of an x86 huge page, and the alignment guest RAM is mapped at.
pub const HUGE_PAGE: usize = 2 << 20;

/// Maps `len` bytes of `file` from `offset` (or anonymous memory, with no file) at an address
/// aligned to [`HUGE_PAGE`]: a reservation one huge page longer is made, the file mapped over
/// its aligned part, and the slack on either side given back. The caller owns the returned
/// mapping.
pub(super) fn map_aligned(
    file: Option<&File>,
    offset: u64,
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
) -> std::io::Result<*mut u8> {
    use std::os::fd::AsRawFd;
    let (fd, flags) = match file {
        Some(f) => (f.as_raw_fd(), flags),
        None => (-1, flags | libc::MAP_ANONYMOUS),
    };
    let offset =
        libc::off_t::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let reserve =
        len.checked_add(HUGE_PAGE).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a new anonymous mapping with no access, at an address the kernel picks; it
    // touches no existing memory.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = base as usize;
    let aligned = (start + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    // SAFETY: `aligned..aligned + len` lies inside the reservation just made, which nothing
    // else uses, so MAP_FIXED replaces only it.
    let addr =
        unsafe { libc::mmap(aligned as *mut libc::c_void, len, prot, flags | libc::MAP_FIXED, fd, offset) };
    if addr == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        // SAFETY: the reservation made above, not yet handed out.
        unsafe { libc::munmap(base, reserve) };
        return Err(e);
    }
    // SAFETY: the reservation's slack before and after the file mapping, still PROT_NONE and
    // unused.
    unsafe {
        if aligned > start {
            libc::munmap(base, aligned - start);
        }
        let end = aligned + len;
        if start + reserve > end {
            libc::munmap(end as *mut libc::c_void, start + reserve - end);
        }
    }
    Ok(addr.cast())
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn write_then_map_private() {
        let mem = create_guest_memory(16).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1234)).unwrap();
        mem.write_slice(b"end", GuestAddress((16 << 20) - 3)).unwrap();
        let path = std::env::temp_dir().join(format!("husk-snap-mem-{}", std::process::id()));
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let layout = write(&mem, &f).unwrap();
        assert_eq!(layout, super::layout(16).unwrap());
        // Zero pages are holes: far fewer blocks than the 16 MiB length.
        use std::os::unix::fs::MetadataExt;
        assert!(f.metadata().unwrap().blocks() * 512 < 1 << 20);
        let restored = map(File::open(&path).unwrap(), &layout, 16).unwrap();
        let host = restored.iter().next().unwrap().as_ptr() as usize;
        assert_eq!(host % HUGE_PAGE, 0, "guest RAM is mapped on a huge page boundary");
        let mut b = [0u8; 5];
        restored.read_slice(&mut b, GuestAddress(0x1234)).unwrap();
        assert_eq!(&b, b"hello");
        // Writes stay private: the file is unchanged.
        restored.write_slice(b"HELLO", GuestAddress(0x1234)).unwrap();
        let mut f2 = [0u8; 5];
        File::open(&path).unwrap().read_exact_at(&mut f2, 0x1234).unwrap();
        assert_eq!(&f2, b"hello");
        // Wrong size, truncated file, foreign layout.
        assert!(matches!(map(File::open(&path).unwrap(), &layout, 32), Err(SnapshotError::Invalid(_))));
        f.set_len(8 << 20).unwrap();
        assert!(matches!(map(File::open(&path).unwrap(), &layout, 16), Err(SnapshotError::Truncated { .. })));
        let _ = std::fs::remove_file(&path);
    }
}
