//! Fuzzes virtio-net's guest-facing paths on stable Rust: random descriptor chains (any flags,
//! addresses in and out of guest memory, lengths up to 4 GiB, loops through `next`), random
//! guest headers and payloads on TX, random host frames into random RX buffers with and
//! without mergeable buffers. Every pass must return, complete what it popped and never panic.
//!
//! `cargo run --release -p husk-vmm --example fuzz_net -- [SECONDS] [SEED]` (default 600 s).

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use husk_vmm::devices::virtio::net::header::{check_tx, NetHdr, TxOffloads, HDR_LEN};
use husk_vmm::devices::virtio::net::queues::{process_rx, process_tx, RxFrame};
use husk_vmm::devices::virtio::net::Backend;
use husk_vmm::memory::GuestMem;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 0x100_0000;

/// xorshift64*: deterministic from the seed, so a crash can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

#[derive(Default)]
struct Tap {
    incoming: VecDeque<Vec<u8>>,
    sent: usize,
    block: bool,
}

impl Backend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let Some(f) = self.incoming.pop_front() else { return Ok(None) };
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(Some(n))
    }
    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        if self.block {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.sent += 1;
        Ok(())
    }
}

fn addr(r: &mut Rng) -> u64 {
    match r.below(8) {
        0 => u64::MAX - r.below(1 << 16),
        1 => MEM - r.below(4096),
        _ => 0x10_0000 + r.below(MEM - 0x10_0000),
    }
}

fn len(r: &mut Rng) -> u32 {
    match r.below(10) {
        0 => 0,
        1 => u32::MAX - r.below(16) as u32,
        2 => 65_562 + r.below(64) as u32,
        3 => r.below(HDR_LEN as u64 + 16) as u32,
        _ => r.below(9000) as u32,
    }
}

/// Random chains: mostly well formed, with random flags and `next` links now and then.
fn chains(r: &mut Rng, qsize: u16) -> Vec<RawDescriptor> {
    let n = 1 + r.below(u64::from(qsize)) as usize;
    (0..n)
        .map(|i| {
            let mut flags = if r.chance(3) { 1 } else { 0 };
            if r.chance(2) {
                flags |= 2;
            }
            if r.chance(20) {
                flags = r.below(1 << 16) as u16;
            }
            let next =
                if r.chance(10) { r.below(u64::from(qsize) * 2) as u16 } else { (i + 1) as u16 % qsize };
            RawDescriptor::from(SplitDescriptor::new(addr(r), len(r), flags, next))
        })
        .collect()
}

fn header(r: &mut Rng) -> NetHdr {
    if r.chance(3) {
        return NetHdr::default();
    }
    NetHdr {
        flags: if r.chance(2) { 1 } else { r.below(256) as u8 },
        gso_type: [0, 1, 3, 4, 5, 0x81, 0x84, r.below(256) as u8][r.below(8) as usize],
        hdr_len: r.below(1 << 16) as u16,
        gso_size: r.below(1 << 16) as u16,
        csum_start: r.below(1 << 16) as u16,
        csum_offset: r.below(1 << 16) as u16,
        num_buffers: r.below(1 << 16) as u16,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(600);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0x9e37_79b9_7f4a_7c15);
    let mut r = Rng(seed | 1);
    let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("memory");
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut iters, mut tx_frames, mut rx_frames, mut headers) = (0u64, 0usize, 0usize, 0u64);
    let mut buf = Vec::new();
    while Instant::now() < end {
        iters += 1;
        let qsize = [2u16, 16, 256][r.below(3) as usize];
        let vq = MockSplitQueue::new(&mem, qsize);
        let descs = chains(&mut r, qsize);
        // Guest payloads where the descriptors point, headers in front of some.
        for d in descs.iter().take(8) {
            let d = SplitDescriptor::from(*d);
            let mut f = vec![0u8; (d.len() as usize).min(9000)];
            if f.len() >= HDR_LEN {
                header(&mut r).write(&mut f);
            }
            let _ = mem.write_slice(&f, GuestAddress(d.addr().0));
        }
        if vq.add_desc_chains(&descs, 0).is_err() {
            continue;
        }
        let Ok(mut q) = vq.create_queue::<Queue>() else { continue };
        let offloads =
            TxOffloads { csum: r.chance(2), tso4: r.chance(2), tso6: r.chance(2), ecn: r.chance(2) };
        let mut tap = Tap { block: r.chance(10), ..Default::default() };
        if r.chance(2) {
            let out = process_tx(&mut q, &mem, &mut tap, offloads, &mut buf);
            tx_frames += out.completed;
        } else {
            for _ in 0..r.below(40) {
                let n = [0, 5, HDR_LEN, 60, 1514, 65_562, 70_000][r.below(7) as usize];
                tap.incoming.push_back((0..n).map(|_| r.next() as u8).collect());
            }
            let mut frame = RxFrame::default();
            for _ in 0..3 {
                let out = process_rx(&mut q, &mem, &mut tap, &mut frame, r.chance(2));
                rx_frames += out.delivered + out.dropped;
            }
        }
        // The header check alone, on raw random bytes.
        let mut raw: Vec<u8> = (0..r.below(128)).map(|_| r.next() as u8).collect();
        let _ = check_tx(&mut raw, offloads);
        headers += 1;
        if iters % 100_000 == 0 {
            eprintln!("fuzz_net: {iters} iterations");
        }
    }
    println!(
        "fuzz_net: {secs} s, seed {seed}: {iters} iterations, {tx_frames} TX chains, {rx_frames} RX frames, {headers} raw headers, no crash"
    );
}
