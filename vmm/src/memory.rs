//! Guest RAM: anonymous, lazily-populated mappings laid out around the 32-bit MMIO hole.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

pub type GuestMem = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} MiB overflows the address space")]
    Size(u64),
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map { mib: u64, source: vm_memory::mmap::FromRangesError },
}

/// RAM ranges for `mib` MiB: below the MMIO hole first, the rest from 4 GiB up.
pub fn ram_ranges(mib: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    let size = mib.checked_mul(1 << 20).ok_or(MemoryError::Size(mib))?;
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), usize::try_from(low).map_err(|_| MemoryError::Size(mib))?)];
    if size > low {
        let high = usize::try_from(size - low).map_err(|_| MemoryError::Size(mib))?;
        ranges.push((GuestAddress(MMIO_HOLE_END), high));
    }
    Ok(ranges)
}

/// Maps the memory (MAP_NORESERVE: pages cost RSS only when the guest touches them).
pub fn create_guest_memory(mib: u64) -> Result<GuestMem, MemoryError> {
    let ranges = ram_ranges(mib)?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_hole() {
        assert_eq!(ram_ranges(128).unwrap(), vec![(GuestAddress(0), 128 << 20)]);
        let r = ram_ranges(4096).unwrap();
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1], (GuestAddress(1 << 32), (4096 << 20) - MMIO_HOLE_START as usize));
        assert!(ram_ranges(u64::MAX).is_err());
    }
}
