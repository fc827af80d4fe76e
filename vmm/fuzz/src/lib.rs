//! Shared pieces of the fuzz targets: a byte-script reader and a minimal split-virtqueue driver
//! that writes descriptor tables and available rings straight into guest memory, so the fuzzer
//! controls every field the device reads (and can corrupt the rings the way a hostile guest can).

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub type Mem = GuestMemoryMmap<()>;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Guest RAM of every iteration: a fresh anonymous mapping (pages cost only when touched).
pub const MEM_SIZE: u64 = 16 << 20;
/// Buffers the harness places for the guest start here (rings live below).
pub const DATA_START: u64 = 1 << 20;

/// Fresh, zeroed guest memory for one iteration.
pub fn guest_memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

/// Reads the fuzzer's input as a script; past the end every read yields zeros, so any input is
/// a valid script.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A guest-physical address: usually inside guest RAM, sometimes any 64-bit value.
    pub fn addr(&mut self) -> u64 {
        let a = self.u32();
        if a & 0x8000_0000 != 0 {
            self.u64()
        } else {
            u64::from(a) % MEM_SIZE
        }
    }

    /// A payload: empty, explicit bytes, or a long run of one byte (to reach size limits
    /// without long inputs).
    pub fn payload(&mut self) -> Vec<u8> {
        match self.u8() % 3 {
            0 => Vec::new(),
            1 => {
                let n = self.u8() as usize;
                self.bytes(n).to_vec()
            }
            _ => {
                let n = self.u16() as usize * 2;
                vec![self.u8(); n]
            }
        }
    }
}

/// Bump allocator for buffers in guest RAM; wraps around when full (buffers of earlier chains
/// may then be overwritten, which a guest may do too).
pub struct Alloc {
    next: u64,
}

impl Default for Alloc {
    fn default() -> Self {
        Self { next: DATA_START }
    }
}

impl Alloc {
    pub fn alloc(&mut self, len: usize) -> u64 {
        let len = (len as u64).min(MEM_SIZE - DATA_START);
        if self.next + len > MEM_SIZE {
            self.next = DATA_START;
        }
        let a = self.next;
        self.next = (self.next + len + 15) & !15;
        a
    }
}

/// The driver side of one split virtqueue.
pub struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
    pub last_head: u16,
}

impl Ring {
    /// Lays the queue out at `base` (as `MockSplitQueue` does) and returns the device's view.
    pub fn new(mem: &Mem, base: u64, size: u16) -> (Self, Queue) {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
        let queue: Queue = mock.create_queue().expect("queue");
        let ring = Self {
            desc: mock.desc_table_addr().0,
            avail: mock.avail_addr().0,
            used: mock.used_addr().0,
            size,
            next_desc: 0,
            avail_idx: 0,
            last_head: 0,
        };
        (ring, queue)
    }

    /// Writes descriptor `idx` (taken modulo the queue size).
    pub fn set_desc(&self, mem: &Mem, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + 16 * u64::from(idx % self.size);
        write_desc(mem, at, addr, len, flags, next);
    }

    /// Makes `head` available to the device.
    pub fn push_avail(&mut self, mem: &Mem, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head.to_le(), GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2));
        self.last_head = head;
    }

    /// Sets the available index to any value, as a confused or hostile driver may.
    pub fn set_avail_idx(&mut self, mem: &Mem, idx: u16) {
        self.avail_idx = idx;
        let _ = mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2));
    }

    /// Writes `descs` (addr, len, flags) as one chain in consecutive table slots (NEXT links
    /// added) and returns the head index; does not make it available.
    pub fn write_chain(&mut self, mem: &Mem, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc % self.size;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = self.next_desc % self.size;
            let next = self.next_desc.wrapping_add(1) % self.size;
            let flags = if i + 1 < descs.len() { flags | F_NEXT } else { flags & !F_NEXT };
            self.set_desc(mem, idx, addr, len, flags, next);
            self.next_desc = next;
        }
        head
    }

    /// Writes `descs` as an indirect table at `table` in guest RAM and a head descriptor that
    /// points to it; returns the head index.
    pub fn write_indirect(&mut self, mem: &Mem, table: u64, descs: &[(u64, u32, u16)]) -> u16 {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let flags = if i + 1 < descs.len() { flags | F_NEXT } else { flags & !F_NEXT };
            write_desc(mem, table + 16 * i as u64, addr, len, flags, i as u16 + 1);
        }
        let head = self.next_desc % self.size;
        self.set_desc(mem, head, table, 16 * descs.len() as u32, F_INDIRECT, 0);
        self.next_desc = self.next_desc.wrapping_add(1) % self.size;
        head
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &Mem) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used + 2)).map(u16::from_le).unwrap_or(0)
    }

    /// One script command that writes a descriptor chain verbatim (any index, address, length,
    /// flags and next) and makes a fuzzer-chosen head available.
    pub fn raw_chain(&mut self, mem: &Mem, inp: &mut Input<'_>) {
        let n = 1 + inp.u8() % 8;
        for _ in 0..n {
            let idx = inp.u16();
            let addr = inp.addr();
            let len = inp.u32();
            let flags = inp.u16();
            let next = inp.u16();
            self.set_desc(mem, idx, addr, len, flags, next);
        }
        let head = inp.u16();
        self.push_avail(mem, head);
    }
}

fn write_desc(mem: &Mem, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..].copy_from_slice(&next.to_le_bytes());
    let _ = mem.write_slice(&raw, GuestAddress(at));
}

/// Splits `len` bytes at `addr` into `parts` contiguous descriptors (the last takes the rest).
pub fn split(addr: u64, len: usize, parts: usize, flags: u16) -> Vec<(u64, u32, u16)> {
    let parts = parts.clamp(1, len.max(1));
    let step = len / parts;
    (0..parts)
        .map(|i| {
            let start = i * step;
            let end = if i + 1 == parts { len } else { start + step };
            (addr + start as u64, (end - start) as u32, flags)
        })
        .collect()
}

/// One script command: writes fuzzer bytes anywhere in guest RAM (rings included).
pub fn mem_write(mem: &Mem, inp: &mut Input<'_>) {
    let addr = inp.addr();
    let n = inp.u8() as usize;
    let _ = mem.write_slice(inp.bytes(n), GuestAddress(addr));
}

/// Raises the soft open-file limit to the hard one (the targets hold many sockets / fds).
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Removes `dir` (recursively) when the process exits normally (libFuzzer calls `exit`).
pub fn at_exit_remove(dir: std::path::PathBuf) {
    static DIRS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    extern "C" fn cleanup() {
        if let Ok(dirs) = DIRS.lock() {
            for d in dirs.iter() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
    let mut dirs = DIRS.lock().unwrap();
    if dirs.is_empty() {
        // SAFETY: registers a plain function with no captured state.
        unsafe { libc::atexit(cleanup) };
    }
    dirs.push(dir);
}
