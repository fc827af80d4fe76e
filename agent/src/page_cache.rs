//! The agent's binary held in 2 MiB pages of the guest's page cache, asked for before the VM is
//! snapshotted.
//!
//! A VM restored from a snapshot maps its guest RAM from the snapshot's memory file, and each
//! guest page it touches first costs a nested page fault; the agent's code and read-only data
//! (the same file, and so the same page cache, for the agent and every container helper it
//! starts) are several hundred of those per sandbox. Where a 2 MiB chunk of guest RAM holds
//! nothing but pages restored guests read, the host maps it whole, with one fault (the host's
//! half: vmm `snapshot::huge_pages`). The initramfs gives the binary 4 KiB pages scattered among
//! pages the guest writes, so no such chunk holds it. Joining its page cache into 2 MiB pages
//! (`MADV_COLLAPSE`, Linux 6.1+; the initramfs root is tmpfs, whose pages Linux joins) gives it
//! chunks of its own. It is a copy of the file's bytes within the page cache, so it is done once,
//! in the VM a snapshot is taken of, not at every boot.

use std::fs::File;
use std::os::fd::AsRawFd;

const HUGE: usize = 2 << 20;

/// What joining did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    /// 2 MiB pieces of the file now held as one page (or that already were).
    pub chunks: u32,
    /// Pieces the kernel did not join (no free 2 MiB page, not a tmpfs file, no THP support).
    pub failed: u32,
}

/// Joins the page cache of the running binary.
pub fn join_own_binary() -> std::io::Result<Joined> {
    join_file(&File::open("/proc/self/exe")?)
}

/// Joins every whole, aligned 2 MiB of `file`'s page cache (a tail shorter than that stays in
/// 4 KiB pages). The file is read, never written.
pub fn join_file(file: &File) -> std::io::Result<Joined> {
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX) & !(HUGE - 1);
    let mut done = Joined::default();
    if len == 0 {
        return Ok(done);
    }
    let map = AlignedMap::new(file, len)?;
    for chunk in (0..len).step_by(HUGE) {
        // SAFETY: `chunk..chunk + HUGE` lies in the read-only file mapping `map` holds. The read
        // gives the range a page table (6.1 joins an untouched range but reports EINVAL for it);
        // the advice rearranges the page cache behind the mapping without changing a byte.
        let rc = unsafe {
            let at = map.addr.add(chunk);
            std::ptr::read_volatile(at);
            libc::madvise(at.cast(), HUGE, libc::MADV_COLLAPSE)
        };
        if rc == 0 {
            done.chunks += 1;
        } else {
            tracing::debug!(
                "binary page cache at {chunk:#x} not joined: {}",
                std::io::Error::last_os_error()
            );
            done.failed += 1;
        }
    }
    Ok(done)
}

/// `len` bytes of a file from offset 0, read-only and shared, at a 2 MiB-aligned address (the
/// kernel joins only ranges whose address and file offset agree modulo 2 MiB).
struct AlignedMap {
    base: *mut libc::c_void,
    reserved: usize,
    addr: *mut u8,
}

impl AlignedMap {
    fn new(file: &File, len: usize) -> std::io::Result<Self> {
        let reserved =
            len.checked_add(HUGE).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new inaccessible anonymous mapping where the kernel picks; touches nothing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let map = Self { base, reserved, addr: ((base as usize + HUGE - 1) & !(HUGE - 1)) as *mut u8 };
        // SAFETY: `addr..addr + len` lies inside the reservation just made, which nothing else
        // uses, so MAP_FIXED replaces only it; `map` unmaps the whole reservation when dropped.
        let at = unsafe {
            libc::mmap(
                map.addr.cast(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(map)
    }
}

impl Drop for AlignedMap {
    fn drop(&mut self) {
        // SAFETY: the reservation (with the file mapping inside it) this value made and owns.
        unsafe { libc::munmap(self.base, self.reserved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// How much of `file`'s first `len` bytes a fresh mapping, read through, maps as 2 MiB
    /// pages (`ShmemPmdMapped`/`FilePmdMapped` in smaps): page cache held in 2 MiB pages.
    fn pmd_mapped_kib(file: &File, len: usize) -> u64 {
        let map = AlignedMap::new(file, len).unwrap();
        for off in (0..len).step_by(4096) {
            // SAFETY: inside the read-only mapping `map` holds.
            unsafe { std::ptr::read_volatile(map.addr.add(off)) };
        }
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", map.addr as usize);
        let vma = smaps.split_once(&start).map(|(_, rest)| rest).unwrap_or("");
        // Its field lines ("Name: value"), up to the next mapping's header ("start-end perms ...",
        // which can hold a ':' of its own, in the device number).
        let vma = vma
            .lines()
            .skip(1)
            .take_while(|l| l.split_whitespace().next().is_some_and(|t| t.ends_with(':')))
            .collect::<Vec<_>>();
        vma.iter()
            .filter_map(|l| l.strip_prefix("ShmemPmdMapped:").or_else(|| l.strip_prefix("FilePmdMapped:")))
            .filter_map(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .sum()
    }

    /// A file of this test's own, removed when dropped.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(dir: &str, name: &str) -> Option<Self> {
            let path = std::path::Path::new(dir).join(format!("husk-agent-{name}-{}", std::process::id()));
            File::create(&path).ok().map(|_| Self(path))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_tmpfs_file_is_joined_whole_chunk_by_chunk_and_keeps_its_bytes() {
        let Some(scratch) = Scratch::new("/dev/shm", "join") else {
            return eprintln!("skipped: no /dev/shm to make a tmpfs file in");
        };
        let path = &scratch.0;
        let mut f = File::create(path).unwrap();
        // Two whole chunks and a tail, with bytes that tell where they came from.
        let data: Vec<u8> = (0..2 * HUGE + 12345).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        drop(f);
        let f = File::open(path).unwrap();
        let joined = join_file(&f).unwrap();
        assert_eq!(joined.chunks + joined.failed, 2, "{joined:?}");
        if joined.chunks == 0 {
            return eprintln!("skipped: this kernel joins no tmpfs pages (no THP)");
        }
        assert_eq!(pmd_mapped_kib(&f, 2 * HUGE), u64::from(joined.chunks) * 2048);
        assert_eq!(std::fs::read(path).unwrap(), data);
    }

    #[test]
    fn a_file_shorter_than_a_chunk_is_left_alone() {
        let scratch = Scratch::new(&std::env::temp_dir().to_string_lossy(), "small").unwrap();
        std::fs::write(&scratch.0, vec![7u8; HUGE - 1]).unwrap();
        assert_eq!(join_file(&File::open(&scratch.0).unwrap()).unwrap(), Joined::default());
    }
}
