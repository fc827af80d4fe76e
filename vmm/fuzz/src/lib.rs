//! Shared pieces of the fuzz targets: a byte-script reader and a minimal split-virtqueue driver
//! that writes descriptor tables and available rings straight into guest memory, so the fuzzer
//! controls every field the device reads (and can corrupt the rings the way a hostile guest can).

use virtio_queue::{Queue, QueueT};
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
    /// Lays the queue out at `base` as a driver does (descriptor table, available ring, used
    /// ring 4-byte aligned after it) and returns the device's view. Not `MockSplitQueue`'s
    /// layout: virtio-queue 0.17 counts the available ring's entries as bytes there, which puts
    /// the used ring inside the available ring (from entry `size / 2` on, `used_event` included)
    /// and lets the device's used-ring writes overwrite heads the driver made available.
    pub fn new(mem: &Mem, base: u64, size: u16) -> (Self, Queue) {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used + 6 + 8 * u64::from(size);
        let _ = mem.write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base));
        let mut queue = Queue::new(size).expect("queue size");
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        assert!(queue.is_valid(mem), "queue layout");
        let ring = Self { desc, avail, used, size, next_desc: 0, avail_idx: 0, last_head: 0 };
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

    /// The available index the driver last published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Writes `used_event` (after the available ring), which the device reads with EVENT_IDX.
    pub fn set_used_event(&self, mem: &Mem, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        let _ = mem.write_obj(idx.to_le(), GuestAddress(at));
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

    /// Used ring entry `i` (taken modulo the queue size) as (id, len).
    pub fn used_elem(&self, mem: &Mem, i: u16) -> (u32, u32) {
        let at = GuestAddress(self.used + 4 + 8 * u64::from(i % self.size));
        let id = mem.read_obj::<u32>(at).map(u32::from_le).unwrap_or(u32::MAX);
        let len = mem.read_obj::<u32>(GuestAddress(at.0 + 4)).map(u32::from_le).unwrap_or(u32::MAX);
        (id, len)
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
