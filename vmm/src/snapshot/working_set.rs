//! A snapshot's working set: the guest pages a VM restored from it touched while its sandbox
//! and first container were set up, recorded once (the `working-set` control command) and
//! partly mapped in before the vCPUs of every later restore run.
//!
//! Every page a restored guest touches first costs a nested page fault: an exit to KVM, which
//! then faults the page into the VMM's mapping (a copy, for a page the guest writes). A page
//! the guest reads and then writes costs three (the read, the write, and a retry after the
//! copy invalidated the first mapping), a page it writes first two. Copying the recorded
//! written pages beforehand (`MADV_POPULATE_WRITE`, a few calls) leaves one fault for each:
//! about a quarter of a restored run's faults go. The copies are the ones the guest would have
//! made anyway, so what siblings share stays the same. Read pages are recorded too but not
//! mapped ahead: on Linux before 6.10 (no `KVM_PRE_FAULT_MEMORY`) their one exit each stays
//! either way, and mapping them from the page cache beforehand measured the same as not.
//! Chunks that were only read are instead held as 2 MiB pages ([`super::huge_pages`]), which
//! takes most of their exits away, and the few chunks the guest touched most, writes among
//! them, are copied whole into private 2 MiB pages ([`super::busy_chunks`]).
//!
//! The record comes from the VMM's own page table (`/proc/self/pagemap`: present, and whether
//! the page is still the file's or already private), taken when the host asks, before any
//! container process has run. It is a hint: a file that is missing, malformed or does not fit
//! this VM is ignored, and its size is bounded both when written and when read.
//!
//! File format (little endian): magic `HUSKWSET`, version u32, run count u32, then per run
//! the first guest page frame (u32) and the page count (u32, bit 31 set for written pages).
//! Runs are sorted and do not overlap.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryRegion};

use super::SnapshotError;
use crate::memory::GuestMem;

/// Name of the working set file inside a snapshot directory.
pub const WORKING_SET_FILE: &str = "working-set";
const MAGIC: &[u8; 8] = b"HUSKWSET";
const VERSION: u32 = 1;
const HEADER: usize = 16;
const RUN: usize = 8;
const WRITTEN: u32 = 1 << 31;
const PAGE: u64 = 4096;
const CHUNK_BYTES: u64 = super::memory::HUGE_PAGE as u64;
const CHUNK_PAGES: u64 = CHUNK_BYTES / PAGE;
/// Most pages a working set holds (64 MiB): a guest that touched more is not recorded.
pub const MAX_PAGES: u64 = 16 << 10;
/// Most written pages (32 MiB): each is a private copy in every restored VM.
pub const MAX_WRITTEN: u64 = 8 << 10;
/// Most runs (the file is read whole, so this bounds its size too).
const MAX_RUNS: usize = 1 << 14;

/// Pages by guest frame, in runs of one kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    runs: Vec<Run>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: u64,
    pages: u64,
    written: bool,
}

impl WorkingSet {
    /// Pages (all, written).
    pub fn pages(&self) -> (u64, u64) {
        let all = self.runs.iter().map(|r| r.pages).sum();
        let written = self.runs.iter().filter(|r| r.written).map(|r| r.pages).sum();
        (all, written)
    }

    /// Builds a set from pages in ascending frame order; refuses one past the bounds.
    fn from_pages(pages: impl IntoIterator<Item = (u64, bool)>) -> Result<Self, SnapshotError> {
        let mut runs: Vec<Run> = Vec::new();
        for (frame, written) in pages {
            if frame > u64::from(u32::MAX) {
                return Err(SnapshotError::Invalid(format!(
                    "working set page frame {frame:#x} is past the format"
                )));
            }
            match runs.last_mut() {
                Some(r) if r.first + r.pages == frame && r.written == written => r.pages += 1,
                Some(r) if frame < r.first + r.pages => {
                    return Err(SnapshotError::Invalid("working set pages out of order".into()))
                }
                _ => runs.push(Run { first: frame, pages: 1, written }),
            }
        }
        let set = Self { runs };
        set.check_bounds()?;
        Ok(set)
    }

    fn check_bounds(&self) -> Result<(), SnapshotError> {
        let (all, written) = self.pages();
        if self.runs.len() > MAX_RUNS || all > MAX_PAGES || written > MAX_WRITTEN {
            return Err(SnapshotError::Refused(format!(
                "working set of {all} pages ({written} written) in {} runs is past the bounds \
                 ({MAX_PAGES} pages, {MAX_WRITTEN} written, {MAX_RUNS} runs)",
                self.runs.len()
            )));
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + RUN * self.runs.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        for r in &self.runs {
            // Bounded by from_pages and check_bounds: frames below 2^32, runs below 2^31 pages.
            out.extend_from_slice(&(r.first as u32).to_le_bytes());
            let len = r.pages as u32 | if r.written { WRITTEN } else { 0 };
            out.extend_from_slice(&len.to_le_bytes());
        }
        out
    }

    /// Parses a file's bytes: the header, the length, sorted non-overlapping runs, the bounds.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let bad = |m: &str| SnapshotError::Corrupt(format!("working set: {m}"));
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(bad("no header"));
        }
        let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        if word(8) != VERSION {
            return Err(bad(&format!("version {}", word(8))));
        }
        let count = word(12) as usize;
        if count > MAX_RUNS || bytes.len() != HEADER + RUN * count {
            return Err(bad(&format!("{} bytes for {count} runs", bytes.len())));
        }
        let mut runs: Vec<Run> = Vec::with_capacity(count);
        for i in 0..count {
            let at = HEADER + RUN * i;
            let (first, len) = (u64::from(word(at)), word(at + 4));
            let pages = u64::from(len & !WRITTEN);
            if pages == 0 {
                return Err(bad("an empty run"));
            }
            if runs.last().is_some_and(|p| first < p.first + p.pages) {
                return Err(bad("runs out of order or overlapping"));
            }
            runs.push(Run { first, pages, written: len & WRITTEN != 0 });
        }
        let set = Self { runs };
        set.check_bounds().map_err(|e| bad(&e.to_string()))?;
        Ok(set)
    }

    /// Reads `path`, if there is one: None when it is missing; an error when it is malformed or
    /// not a regular file (never followed if a symlink, never waited on if a FIFO: a VMM writes
    /// the file husk reads first).
    pub fn load(path: &std::path::Path) -> Result<Option<Self>, SnapshotError> {
        use std::os::unix::fs::OpenOptionsExt;
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path);
        let f = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SnapshotError::Io { what: "open working set", source }),
        };
        let max = (HEADER + RUN * MAX_RUNS) as u64;
        let meta = f.metadata().map_err(|source| SnapshotError::Io { what: "stat working set", source })?;
        if !meta.is_file() {
            return Err(SnapshotError::Corrupt("working set: not a regular file".into()));
        }
        let len = meta.len();
        if len > max {
            return Err(SnapshotError::Corrupt(format!("working set: {len} bytes, at most {max}")));
        }
        let mut bytes = vec![0u8; len as usize];
        f.read_exact_at(&mut bytes, 0)
            .map_err(|source| SnapshotError::Io { what: "read working set", source })?;
        Self::decode(&bytes).map(Some)
    }

    /// Records the pages of `mem` present in this process's page table, from `pagemap` (this
    /// process's `/proc/self/pagemap`, opened before the jail): a page still the file's was
    /// only read, a private one was written.
    pub fn record(mem: &GuestMem, pagemap: &File) -> Result<Self, SnapshotError> {
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE_OR_SHARED: u64 = 1 << 61;
        const CHUNK: usize = 4096;
        let mut pages = Vec::new();
        let mut buf = vec![0u8; CHUNK * 8];
        for region in mem.iter() {
            let (host, len, gpa) = (region.as_ptr() as u64, region.len(), region.start_addr().0);
            let count = len / PAGE;
            let mut done = 0u64;
            while done < count {
                let n = (count - done).min(CHUNK as u64) as usize;
                let bytes = &mut buf[..n * 8];
                pagemap
                    .read_exact_at(bytes, (host / PAGE + done) * 8)
                    .map_err(|source| SnapshotError::Io { what: "read pagemap", source })?;
                for (i, e) in bytes.chunks_exact(8).enumerate() {
                    let e = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                    if e & (PRESENT | SWAPPED) != 0 {
                        let written = e & SWAPPED != 0 || e & FILE_OR_SHARED == 0;
                        pages.push((gpa / PAGE + done + i as u64, written));
                        if pages.len() as u64 > MAX_PAGES {
                            return Err(SnapshotError::Refused(format!(
                                "the guest has touched more than {MAX_PAGES} pages"
                            )));
                        }
                    }
                }
                done += n as u64;
            }
        }
        Self::from_pages(pages)
    }

    /// The guest addresses of the 2 MiB chunks where the guest read at least `min_read` pages
    /// and wrote none, in order.
    pub fn read_only_chunks(&self, min_read: u64) -> Vec<u64> {
        self.per_chunk()
            .into_iter()
            .filter(|(_, (read, written))| *written == 0 && *read >= min_read)
            .map(|(chunk, _)| chunk * CHUNK_BYTES)
            .collect()
    }

    /// The guest addresses of the 2 MiB chunks the guest wrote in whose score (below) is at
    /// least `min_score`, the `max` best of them, in address order.
    ///
    /// A chunk's score estimates the nested faults its pages cost a restored guest: one per
    /// written page, and one per four read. Reads count less because the record overstates
    /// them: a read fault on the host maps the file's neighbouring pages too (fault-around),
    /// and the record sees those as read. Measured on one working set, the score tracked the
    /// faults per chunk within about a third.
    pub fn busy_written_chunks(&self, min_score: u64, max: usize) -> Vec<u64> {
        let mut chunks: Vec<(u64, u64)> = self
            .per_chunk()
            .into_iter()
            .filter(|(_, (_, written))| *written > 0)
            .map(|(chunk, (read, written))| (chunk, written + read / 4))
            .filter(|(_, score)| *score >= min_score)
            .collect();
        // Best first; the lower address first among equals, so the choice is stable.
        chunks.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut picked: Vec<u64> = chunks.into_iter().take(max).map(|(c, _)| c * CHUNK_BYTES).collect();
        picked.sort_unstable();
        picked
    }

    /// Pages read and pages written per 2 MiB chunk (by chunk number).
    fn per_chunk(&self) -> std::collections::BTreeMap<u64, (u64, u64)> {
        let mut chunks: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
        for r in &self.runs {
            let mut page = r.first;
            let end = r.first + r.pages;
            while page < end {
                let chunk = page / CHUNK_PAGES;
                let upto = end.min((chunk + 1) * CHUNK_PAGES);
                let c = chunks.entry(chunk).or_default();
                if r.written {
                    c.1 += upto - page;
                } else {
                    c.0 += upto - page;
                }
                page = upto;
            }
        }
        chunks
    }

    /// Copies the set's written pages into `mem`'s private mapping ahead of the guest, and
    /// returns how many; pages in the 2 MiB chunks at `except` (already private) are passed
    /// by. Every run must lie in guest RAM (a set that does not fit this VM is refused whole,
    /// before anything is done). An error from the kernel (one without `MADV_POPULATE_WRITE`,
    /// before 5.14) ends it early: the guest then faults the rest in itself.
    pub fn copy_written(&self, mem: &GuestMem, except: &[u64]) -> Result<u64, SnapshotError> {
        let mut ranges = Vec::with_capacity(self.runs.len());
        for r in &self.runs {
            let (addr, len) = (r.first * PAGE, r.pages * PAGE);
            let outside =
                || SnapshotError::Mismatch(format!("working set run at {addr:#x} is not guest RAM"));
            let region = mem.find_region(GuestAddress(addr)).ok_or_else(outside)?;
            let offset = addr - region.start_addr().0;
            if offset + len > region.len() {
                return Err(outside());
            }
            if !r.written {
                continue;
            }
            // The run's pieces, chunk by chunk, less those in `except`.
            let mut at = addr;
            while at < addr + len {
                let upto = (addr + len).min((at / CHUNK_BYTES + 1) * CHUNK_BYTES);
                if !except.contains(&(at / CHUNK_BYTES * CHUNK_BYTES)) {
                    let within = (at - region.start_addr().0) as usize;
                    // In bounds of the region's mapping, checked just above.
                    ranges.push((region.as_ptr().wrapping_add(within), (upto - at) as usize));
                }
                at = upto;
            }
        }
        let mut copied = 0u64;
        for (ptr, len) in ranges {
            // SAFETY: `ptr..ptr + len` lies inside a mapping of guest memory that `mem` keeps
            // alive; populating for write makes the private copy of each page, of the same
            // bytes, which changes nothing the guest sees.
            if unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) } != 0 {
                tracing::debug!("working set: madvise: {}", std::io::Error::last_os_error());
                break;
            }
            copied += (len as u64) / PAGE;
        }
        Ok(copied)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::Bytes;

    use super::*;

    /// The read and the written frames of a set.
    fn split(ws: &WorkingSet) -> (Vec<u64>, Vec<u64>) {
        let frames = |w: bool| {
            ws.runs.iter().filter(|r| r.written == w).flat_map(|r| r.first..r.first + r.pages).collect()
        };
        (frames(false), frames(true))
    }

    fn set(pages: &[(u64, bool)]) -> WorkingSet {
        WorkingSet::from_pages(pages.iter().copied()).unwrap()
    }

    #[test]
    fn pages_merge_into_runs_and_round_trip() {
        let s = set(&[(1, false), (2, false), (3, true), (4, true), (9, false)]);
        assert_eq!(s.runs.len(), 3);
        assert_eq!(s.pages(), (5, 2));
        assert_eq!(WorkingSet::decode(&s.encode()).unwrap(), s);
        assert_eq!(WorkingSet::decode(&WorkingSet::default().encode()).unwrap(), WorkingSet::default());
    }

    #[test]
    fn read_only_chunks_are_those_read_enough_and_never_written() {
        let mut pages = Vec::new();
        // Chunk 0: 40 pages read. Chunk 1: 40 read and one written. Chunk 2: 3 read.
        // Chunk 3 and 4: one run of reads across the boundary, 20 pages in 3 and 30 in 4.
        pages.extend((0..40).map(|p| (p, false)));
        pages.extend((512..552).map(|p| (p, false)));
        pages.push((600, true));
        pages.extend((1024..1027).map(|p| (p, false)));
        pages.extend((2028..2078).map(|p| (p, false)));
        let ws = set(&pages);
        let chunk = 2 << 20;
        assert_eq!(ws.read_only_chunks(1), vec![0, 2 * chunk, 3 * chunk, 4 * chunk]);
        assert_eq!(ws.read_only_chunks(25), vec![0, 4 * chunk]);
        assert!(WorkingSet::default().read_only_chunks(1).is_empty());
    }

    #[test]
    fn busy_chunks_are_the_best_scored_written_ones() {
        let mut pages = Vec::new();
        // Chunk 0: 200 read, 10 written (score 60). Chunk 1: 80 written (80). Chunk 2: 400
        // read only (never picked). Chunk 3: 8 read, 70 written (72). Chunk 4: 20 written (20).
        pages.extend((0..200).map(|p| (p, false)));
        pages.extend((200..210).map(|p| (p, true)));
        pages.extend((512..592).map(|p| (p, true)));
        pages.extend((1024..1424).map(|p| (p, false)));
        pages.extend((1536..1544).map(|p| (p, false)));
        pages.extend((1544..1614).map(|p| (p, true)));
        pages.extend((2048..2068).map(|p| (p, true)));
        let ws = set(&pages);
        let chunk = 2 << 20;
        assert_eq!(ws.busy_written_chunks(64, 8), vec![chunk, 3 * chunk]);
        assert_eq!(ws.busy_written_chunks(1, 8), vec![0, chunk, 3 * chunk, 4 * chunk]);
        // The best two, in address order.
        assert_eq!(ws.busy_written_chunks(1, 2), vec![chunk, 3 * chunk]);
        assert!(ws.busy_written_chunks(1, 0).is_empty());
    }

    #[test]
    fn copying_written_pages_passes_by_the_chunks_given() {
        let path = std::env::temp_dir().join(format!("husk-ws-except-{}", std::process::id()));
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(6 << 20).unwrap();
        let layout = vec![super::super::state::MemRegion { guest_addr: 0, len: 6 << 20, file_offset: 0 }];
        let mem = super::super::memory::map_regions(File::open(&path).unwrap(), &layout).unwrap();
        // One run of written pages across the boundary of chunks 0 and 1, and one in chunk 2.
        let ws = set(&[(510, true), (511, true), (512, true), (513, true), (1100, true)]);
        assert_eq!(ws.copy_written(&mem, &[2 << 20]).unwrap(), 3, "chunk 1's two pages passed by");
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let (_, written) = split(&WorkingSet::record(&mem, &pagemap).unwrap());
        assert_eq!(written, vec![510, 511, 1100]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn hostile_files_are_refused() {
        let good = set(&[(10, false), (20, true)]).encode();
        let mut cases: Vec<Vec<u8>> =
            vec![Vec::new(), good[..HEADER - 1].to_vec(), good[..good.len() - 1].to_vec()];
        let mut extra = good.clone();
        extra.push(0);
        cases.push(extra);
        let mut magic = good.clone();
        magic[0] ^= 1;
        cases.push(magic);
        let mut version = good.clone();
        version[8] = 9;
        cases.push(version);
        let mut count = good.clone();
        count[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        cases.push(count);
        // Runs out of order, overlapping, empty.
        let runs = |r: &[(u32, u32)]| {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&VERSION.to_le_bytes());
            b.extend_from_slice(&(r.len() as u32).to_le_bytes());
            for (f, l) in r {
                b.extend_from_slice(&f.to_le_bytes());
                b.extend_from_slice(&l.to_le_bytes());
            }
            b
        };
        cases.push(runs(&[(20, 1), (10, 1)]));
        cases.push(runs(&[(10, 5), (12, 1)]));
        cases.push(runs(&[(10, 0)]));
        cases.push(runs(&[(10, WRITTEN)]));
        // Past the bounds: too many pages, too many written.
        cases.push(runs(&[(0, (MAX_PAGES + 1) as u32)]));
        cases.push(runs(&[(0, (MAX_WRITTEN + 1) as u32 | WRITTEN)]));
        for (i, c) in cases.iter().enumerate() {
            assert!(WorkingSet::decode(c).is_err(), "case {i} accepted");
        }
        assert!(WorkingSet::decode(&runs(&[(0, MAX_PAGES as u32)])).is_ok());
    }

    #[test]
    fn sets_past_the_bounds_are_not_made() {
        let many = (0..=MAX_WRITTEN).map(|f| (f, true));
        assert!(matches!(WorkingSet::from_pages(many), Err(SnapshotError::Refused(_))));
        assert!(WorkingSet::from_pages([(5, false), (4, false)]).is_err());
        assert!(WorkingSet::from_pages([(1 << 32, false)]).is_err());
    }

    #[test]
    fn a_missing_file_is_none_and_a_long_one_an_error() {
        let d = std::env::temp_dir().join(format!("husk-ws-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(WorkingSet::load(&d.join("none")).unwrap(), None);
        let long = d.join("long");
        let f = File::create(&long).unwrap();
        f.set_len((HEADER + RUN * MAX_RUNS + 1) as u64).unwrap();
        assert!(WorkingSet::load(&long).is_err());
        // What a VMM could leave instead of a file: a symlink to a host file, a FIFO.
        let link = d.join("link");
        std::os::unix::fs::symlink(&long, &link).unwrap();
        assert!(WorkingSet::load(&link).is_err());
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(WorkingSet::load(&fifo).is_err(), "refused at once, not waited on");
        let ok = d.join("ok");
        std::fs::write(&ok, set(&[(3, true)]).encode()).unwrap();
        assert_eq!(WorkingSet::load(&ok).unwrap(), Some(set(&[(3, true)])));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A memory file mapped private, as a restore maps it; pages read and written through the
    /// mapping show up as such, and a recorded set populates a fresh mapping of the same file.
    #[test]
    fn recording_sees_read_and_written_pages_and_populating_maps_them() {
        let path = std::env::temp_dir().join(format!("husk-ws-mem-{}", std::process::id()));
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[7u8; 4096 * 4], 0).unwrap();
        let layout = vec![super::super::state::MemRegion { guest_addr: 0, len: 1 << 20, file_offset: 0 }];
        let mem = super::super::memory::map_regions(File::open(&path).unwrap(), &layout).unwrap();
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(PAGE)).unwrap();
        mem.write_slice(&[1], GuestAddress(2 * PAGE)).unwrap();
        mem.write_slice(&[1], GuestAddress(100 * PAGE)).unwrap();
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let ws = WorkingSet::record(&mem, &pagemap).unwrap();
        // Read faults also map neighbours already in the page cache (fault-around): pages 0-3
        // are the file's data, so any of them may be there as read.
        let (read, written) = split(&ws);
        assert_eq!(written, vec![2, 100], "{ws:?}");
        assert!(read.contains(&1) && read.iter().all(|p| [0, 1, 3].contains(p)), "{ws:?}");

        let fresh = super::super::memory::map_regions(File::open(&path).unwrap(), &layout).unwrap();
        assert_eq!(ws.copy_written(&fresh, &[]).unwrap(), 2);
        let (read2, written2) = split(&WorkingSet::record(&fresh, &pagemap).unwrap());
        assert_eq!(written2, written, "the written pages are private copies at once");
        assert!(read2.is_empty(), "read pages are left to the guest: {read2:?}");
        // The bytes are the file's; the file is unchanged.
        fresh.read_slice(&mut b, GuestAddress(2 * PAGE)).unwrap();
        assert_eq!(b, [7]);
        let mut fb = [0u8; 1];
        f.read_exact_at(&mut fb, 2 * PAGE).unwrap();
        assert_eq!(fb, [7]);

        // A set that does not fit the VM is refused before anything is copied.
        assert!(set(&[(1, true), (1 << 20, false)]).copy_written(&fresh, &[]).is_err());
        let _ = std::fs::remove_file(&path);
    }
}
