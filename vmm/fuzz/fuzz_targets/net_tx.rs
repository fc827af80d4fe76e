//! virtio-net from a hostile guest: the input is a preamble (the features the driver acked and
//! the queue sizes it chose) and a script of guest TX frames (a 12-byte virtio-net header whose
//! fields are mostly plausible and each replaceable by raw values, packets up to 64 KiB and a
//! bit, over 1-4 descriptors), raw descriptor chains, writes anywhere in guest RAM (rings
//! included), avail-index and used_event writes, RX buffers, frames arriving from a simulated
//! tap, and device passes.
//!
//! The device code is the worker's: `queues::process_tx` / `process_rx` on real guest memory
//! against a `Backend`. `NetWorker` and `run_worker` (net/mod.rs) are private and need a tap
//! and epoll, so their loops are copied here (`worker_tx`, `worker_rx`, `turn`) with one check
//! added: two rounds in a row that changed nothing mean the real loop never ends.
//!
//! Every iteration gets fresh guest memory, queues and tap, so a crash replays from its input
//! alone.

#![no_main]

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use husk_vmm::devices::virtio::net::header::{NetHdr, TxOffloads, ETH_HLEN, HDR_LEN, MAX_FRAME};
use husk_vmm::devices::virtio::net::queues::{
    process_rx, process_tx, RxFrame, RxOutcome, TxOutcome, BATCH, FRAME_BUF,
};
use husk_vmm::devices::virtio::net::{tap_offloads, tx_offloads, Backend, QUEUE_SIZE};
use husk_vmm_fuzz::*;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const TX_RING: u64 = 0x1_0000;
const RX_RING: u64 = 0x2_0000;
const MAX_COMMANDS: usize = 96;
/// What the simulated tap holds for the guest at most (a real tap's queue is bounded too).
const TAP_QUEUE_BYTES: usize = 8 << 20;
const NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
const GSO_ECN: u8 = VIRTIO_NET_HDR_GSO_ECN as u8;

fn bit(b: u32) -> u64 {
    1 << b
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| env_flag("HUSK_FUZZ_DEBUG"))
}

/// Lets a run go on past the known endless worker loops (README, bug 3) instead of stopping
/// at the first input that reaches one.
fn allow_spin() -> bool {
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| env_flag("HUSK_FUZZ_NET_ALLOW_SPIN"))
}

macro_rules! log {
    ($($t:tt)*) => {
        if debug() {
            eprintln!($($t)*);
        }
    };
}

/// The features the preamble's first byte takes away, one per bit: the zero byte acks every
/// offload the device offers, as Linux does.
fn acked_features(b: u8) -> u64 {
    let choices = [
        bit(VIRTIO_NET_F_CSUM),
        bit(VIRTIO_NET_F_HOST_TSO4),
        bit(VIRTIO_NET_F_HOST_TSO6),
        bit(VIRTIO_NET_F_HOST_ECN),
        bit(VIRTIO_NET_F_MRG_RXBUF),
        bit(VIRTIO_RING_F_EVENT_IDX),
        bit(VIRTIO_NET_F_GUEST_CSUM),
        bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_GUEST_ECN),
    ];
    choices.iter().enumerate().filter(|&(i, _)| b & (1 << i) == 0).fold(0, |f, (_, c)| f | c)
}

/// What may reach the tap, written from the spec (5.1.6.2) and header.rs's promises rather than
/// from `check_tx`, so that a slip in the check shows here.
fn check_sent(frame: &[u8], off: TxOffloads) {
    assert!(
        (HDR_LEN + ETH_HLEN..=FRAME_BUF).contains(&frame.len()),
        "a {}-byte frame reached the tap",
        frame.len()
    );
    let h = NetHdr::parse(frame).expect("length checked above");
    let len = frame.len() - HDR_LEN;
    let needs_csum = h.flags == NEEDS_CSUM;
    assert!(h.flags == 0 || needs_csum, "header flags {:#x} reached the tap", h.flags);
    if needs_csum {
        assert!(off.csum, "NEEDS_CSUM without NET_F_CSUM reached the tap");
        let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
        assert!(end <= len, "checksum field ending at {end} of a {len}-byte packet reached the tap");
    }
    let ecn = h.gso_type & GSO_ECN != 0;
    let gso = u32::from(h.gso_type & !GSO_ECN);
    let ok = match gso {
        VIRTIO_NET_HDR_GSO_NONE => !ecn,
        VIRTIO_NET_HDR_GSO_TCPV4 => off.tso4 && (!ecn || off.ecn),
        VIRTIO_NET_HDR_GSO_TCPV6 => off.tso6 && (!ecn || off.ecn),
        _ => false,
    };
    assert!(ok, "GSO type {:#x} reached the tap with {off:?}", h.gso_type);
    if gso != VIRTIO_NET_HDR_GSO_NONE {
        assert!(needs_csum && h.gso_size > 0, "GSO header {h:?} reached the tap");
        assert!(usize::from(h.hdr_len) <= len, "GSO hdr_len past a {len}-byte packet reached the tap");
    }
    assert_eq!(h.num_buffers, 0, "num_buffers reached the tap");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendMode {
    Ok,
    WouldBlock,
    Fail,
}

/// The host end: frames queued for the guest, and a check of every frame the guest gets out.
struct Tap {
    incoming: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    /// Frames the device read, and frames it sent (and the tap took).
    reads: usize,
    sends: usize,
    send_mode: SendMode,
    recv_fails: bool,
    offloads: TxOffloads,
}

impl Backend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if self.recv_fails {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let Some(f) = self.incoming.pop_front() else { return Ok(None) };
        self.queued_bytes -= f.len();
        self.reads += 1;
        // A tap read into a shorter buffer truncates the frame.
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(Some(n))
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        check_sent(frame, self.offloads);
        match self.send_mode {
            SendMode::Ok => {
                self.sends += 1;
                Ok(())
            }
            SendMode::WouldBlock => Err(io::ErrorKind::WouldBlock.into()),
            // What the kernel answers a header it rejects after all.
            SendMode::Fail => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

/// A packet of up to 64 KiB and a bit: common sizes, the edges of the size limits, or bytes
/// from the input.
fn tx_payload(inp: &mut Input<'_>) -> Vec<u8> {
    match inp.u8() % 5 {
        0 => pattern([60, 1514, 9014, 65_535][usize::from(inp.u8() % 4)]),
        1 => {
            let n = usize::from(inp.u8());
            inp.bytes(n).to_vec()
        }
        2 => {
            let n = usize::from(inp.u16());
            vec![inp.u8(); n]
        }
        // The largest frame the device takes, ±2.
        3 => pattern(MAX_FRAME - 2 + usize::from(inp.u8() % 5)),
        // Around the shortest (an Ethernet header).
        _ => pattern(usize::from(inp.u8()) % (ETH_HLEN + 4)),
    }
}

/// The guest's used_event (for the debug log).
fn used_event(mem: &Mem, ring: &Ring) -> u16 {
    let at = GuestAddress(ring.avail + 4 + 2 * u64::from(ring.size));
    mem.read_obj::<u16>(at).map(u16::from_le).unwrap_or(0)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| i as u8).collect()
}

/// The header a Linux driver writes for a `len`-byte packet of the kind the script picks, then
/// the fields the override byte names replaced by raw values.
fn tx_header(inp: &mut Input<'_>, len: usize) -> NetHdr {
    let csum =
        |csum_start, csum_offset| NetHdr { flags: NEEDS_CSUM, csum_start, csum_offset, ..Default::default() };
    let gso = |gso_type: u32, hdr_len, csum_start, csum_offset| NetHdr {
        gso_type: gso_type as u8,
        hdr_len,
        gso_size: 1448,
        ..csum(csum_start, csum_offset)
    };
    let mut h = match inp.u8() % 8 {
        0 => NetHdr::default(),
        1 => csum(34, 16),
        2 => csum(34, 6),
        3 => gso(VIRTIO_NET_HDR_GSO_TCPV4, 66, 34, 16),
        4 => gso(VIRTIO_NET_HDR_GSO_TCPV6, 86, 54, 16),
        5 => gso(VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, 66, 34, 16),
        // Never offered: UFO and USO.
        6 => gso(VIRTIO_NET_HDR_GSO_UDP, 42, 34, 6),
        _ => gso(VIRTIO_NET_HDR_GSO_UDP_L4, 42, 34, 6),
    };
    let over = inp.u8();
    if over & 1 != 0 {
        h.flags = inp.u8();
    }
    if over & 2 != 0 {
        h.gso_type = inp.u8();
    }
    if over & 4 != 0 {
        h.hdr_len = inp.u16();
    }
    if over & 8 != 0 {
        h.gso_size = inp.u16();
    }
    if over & 0x10 != 0 {
        h.csum_start = inp.u16();
    }
    if over & 0x20 != 0 {
        h.csum_offset = inp.u16();
    }
    if over & 0x40 != 0 {
        h.num_buffers = inp.u16();
    }
    if over & 0x80 != 0 {
        // The checksum field and the GSO headers end within 2 bytes of the packet's end: the
        // edges of the bounds checks.
        let d = i64::from(inp.u8() % 5) - 2;
        let edge = |v: i64| v.clamp(0, 0xffff) as u16;
        h.csum_start = edge(len as i64 - 2 - i64::from(h.csum_offset) + d);
        h.hdr_len = edge(len as i64 + d);
    }
    h
}

struct Run<'a> {
    mem: &'a Mem,
    tx: Ring,
    txq: Queue,
    rx: Ring,
    rxq: Queue,
    alloc: Alloc,
    tap: Tap,
    offloads: TxOffloads,
    /// TUN_F_* bits the tap would be set to: what its frames' headers may ask of the guest.
    tun_offloads: libc::c_uint,
    mergeable: bool,
    rx_frame: RxFrame,
    tx_buf: Vec<u8>,
    // NetWorker's flags and run_worker's loop state.
    tap_readable: bool,
    tx_blocked: bool,
    rx_more: bool,
    tx_more: bool,
    /// Edge-triggered tap events owed to the next turn: frames came, the tap took writes again.
    tap_in_edge: bool,
    tap_out_edge: bool,
}

impl Run<'_> {
    /// One `process_tx` call, checked: each completion is one used entry of length 0, and each
    /// chain popped was sent or dropped.
    fn tx_pass(&mut self) -> TxOutcome {
        let used = self.txq.next_used();
        let sends = self.tap.sends;
        let r = process_tx(&mut self.txq, self.mem, &mut self.tap, self.offloads, &mut self.tx_buf);
        log!("  process_tx: {r:?}");
        assert!(r.completed <= BATCH && (!r.more || r.completed == BATCH));
        let n = self.txq.next_used().wrapping_sub(used);
        assert_eq!(usize::from(n), r.completed, "TX used entries vs completions");
        for i in 0..n {
            let (id, len) = self.tx.used_elem(self.mem, used.wrapping_add(i));
            assert!(id < u32::from(self.tx.size) && len == 0, "TX used entry ({id}, {len})");
        }
        // A head past the queue's end cannot be completed (virtio-queue's add_used refuses
        // it): process_tx counts that chain as dropped and ends the pass there.
        let handled = self.tap.sends - sends + r.dropped;
        let refused = handled == r.completed + 1 && self.last_tx_head() >= self.tx.size;
        assert!(handled == r.completed || refused, "{} sent, {r:?}", self.tap.sends - sends);
        r
    }

    /// The head of the chain `process_tx` popped last (the avail ring is the driver's, so the
    /// pass did not change it).
    fn last_tx_head(&self) -> u16 {
        let slot = self.txq.next_avail().wrapping_sub(1) % self.tx.size;
        let at = GuestAddress(self.tx.avail + 4 + 2 * u64::from(slot));
        self.mem.read_obj::<u16>(at).map(u16::from_le).unwrap_or(0)
    }

    /// One `process_rx` call, checked: every frame read from the tap is delivered, dropped or
    /// held for the next call, none twice.
    fn rx_pass(&mut self) -> RxOutcome {
        let reads = self.tap.reads;
        let held = usize::from(self.rx_frame.pending());
        let r = process_rx(&mut self.rxq, self.mem, &mut self.tap, &mut self.rx_frame, self.mergeable);
        log!("  process_rx: {r:?}");
        let left = usize::from(self.rx_frame.pending());
        assert_eq!(
            self.tap.reads - reads + held,
            r.delivered + r.dropped + left,
            "RX frames lost or doubled"
        );
        assert!(r.delivered + r.dropped <= BATCH);
        r
    }

    /// The real worker would go round forever: report it, or (with the knob) leave the loop as
    /// if it had stopped, so the run explores past it.
    fn spin(&self, which: &str, ring: &Ring, q: &Queue) {
        let avail = self.mem.read_obj::<u16>(GuestAddress(ring.avail + 2)).map(u16::from_le).unwrap_or(0);
        let msg = format!(
            "virtio-net NetWorker::{which}() never returns: a pass makes no progress and \
             enable_notification() still reports work (next_avail {}, avail idx {avail}, queue size {})",
            q.next_avail(),
            ring.size
        );
        if !allow_spin() {
            panic!("{msg}");
        }
        log!("  {msg}");
    }

    /// `NetWorker::tx`: passes until the queue is empty, the tap blocks or a batch is full; a
    /// pass with nothing done is retried once (a post that raced with it), then it returns.
    fn worker_tx(&mut self) -> (bool, bool) {
        let mut used = false;
        let (mut idle_retry, mut idle) = (true, 0);
        loop {
            let _ = self.txq.disable_notification(self.mem);
            let r = self.tx_pass();
            let progress = r.completed + r.dropped > 0;
            used |= r.completed > 0;
            self.tx_blocked = r.blocked;
            if r.blocked || r.more {
                let _ = self.txq.enable_notification(self.mem);
                return (used, r.more);
            }
            match self.txq.enable_notification(self.mem) {
                Ok(true) if progress || std::mem::take(&mut idle_retry) => {
                    idle = if progress { 0 } else { idle + 1 };
                    if idle == 2 {
                        self.spin("tx", &self.tx, &self.txq);
                        return (used, false);
                    }
                }
                _ => return (used, false),
            }
        }
    }

    /// `NetWorker::rx`: passes until the tap is drained or the guest is out of buffers; then
    /// asks for a kick at the guest's next post and goes on only if it posted meanwhile (after
    /// a pass with nothing done, once).
    fn worker_rx(&mut self) -> (bool, bool) {
        let mut used = false;
        let (mut idle_retry, mut idle) = (true, 0);
        loop {
            let seen = self.rxq.avail_idx(self.mem, Ordering::Acquire).map(|i| i.0).unwrap_or(0);
            let r = self.rx_pass();
            let progress = r.delivered + r.dropped > 0;
            used |= progress;
            if r.drained {
                self.tap_readable = false;
            }
            if r.more {
                return (used, true);
            }
            if !r.out_of_buffers {
                return (used, false);
            }
            if kick_on_next_post(&mut self.rxq, self.mem, seen)
                && (progress || std::mem::take(&mut idle_retry))
            {
                idle = if progress { 0 } else { idle + 1 };
                if idle == 2 {
                    self.spin("rx", &self.rx, &self.rxq);
                    return (used, false);
                }
                continue;
            }
            return (used, false);
        }
    }

    /// One turn of `run_worker`'s event loop after epoll reported these events.
    fn turn(&mut self, kick_tx: bool, kick_rx: bool, tap_in: bool, tap_out: bool) {
        let (mut run_rx, mut run_tx) = (self.rx_more || kick_rx, self.tx_more || kick_tx);
        if tap_in {
            self.tap_readable = true;
            run_rx = true;
        }
        if tap_out && self.tx_blocked {
            run_tx = true;
        }
        log!("turn: run_tx {run_tx} run_rx {run_rx} tap_readable {}", self.tap_readable);
        let (mut rx_used, mut tx_used) = (false, false);
        if run_tx {
            (tx_used, self.tx_more) = self.worker_tx();
        }
        if run_rx && (self.tap_readable || self.rx_frame.pending()) {
            (rx_used, self.rx_more) = self.worker_rx();
        } else {
            self.rx_more = false;
        }
        // With EVENT_IDX this reads the guest's used_event.
        let notify = (rx_used && self.rxq.needs_notification(self.mem).unwrap_or(true))
            | (tx_used && self.txq.needs_notification(self.mem).unwrap_or(true));
        log!(
            "  notify {notify}, tx_more {}, rx_more {}, used tx {} rx {}, used_event tx {} rx {}",
            self.tx_more,
            self.rx_more,
            self.txq.next_used(),
            self.rxq.next_used(),
            used_event(self.mem, &self.tx),
            used_event(self.mem, &self.rx)
        );
    }

    /// Up to `budget` turns: the first sees the events the script names (a set bit takes one
    /// away, so the zero byte is every event) plus the edges the tap owes; the later ones are
    /// the polls the worker makes while a direction has work left.
    fn turns(&mut self, events: u8, budget: u8) {
        let ev = !events;
        let mut e =
            (ev & 1 != 0, ev & 2 != 0, ev & 4 != 0 || self.tap_in_edge, ev & 8 != 0 || self.tap_out_edge);
        (self.tap_in_edge, self.tap_out_edge) = (false, false);
        for i in 0..budget.max(1) {
            if i > 0 && !(self.rx_more || self.tx_more) {
                break; // the worker would sleep in epoll_wait
            }
            self.turn(e.0, e.1, e.2, e.3);
            e = (false, false, false, false);
        }
    }

    fn pass(&mut self, inp: &mut Input<'_>) {
        let kind = inp.u8();
        let budget = 1 + inp.u8() % 8;
        match kind % 4 {
            0 | 1 => {
                let events = inp.u8();
                self.turns(events, budget);
            }
            // Bare passes, outside the worker's loops (states the loops would not leave).
            2 => {
                for _ in 0..budget {
                    self.tx_pass();
                }
            }
            _ => {
                for _ in 0..budget {
                    self.rx_pass();
                }
            }
        }
    }

    /// A TX frame: a header, a packet, laid out over descriptors as the script says.
    fn tx_frame(&mut self, inp: &mut Input<'_>) {
        let payload = tx_payload(inp);
        let h = tx_header(inp, payload.len());
        let mut bytes = vec![0u8; HDR_LEN];
        h.write(&mut bytes);
        bytes.extend_from_slice(&payload);
        let len = bytes.len();
        let layout = inp.u8();
        let n = 1 + usize::from(layout & 3);
        let addr = if layout & 0x80 != 0 {
            // Across the end of guest RAM: the tail cannot be read.
            MEM_SIZE - len as u64 / 2
        } else {
            self.alloc.alloc(len)
        };
        let _ = self.mem.write_slice(&bytes, GuestAddress(addr));
        let mut cuts: Vec<usize> = if layout & 4 != 0 {
            (1..n).map(|_| usize::from(inp.u16()) % (len + 1)).collect()
        } else if n > 1 {
            // The header alone, then the packet in even pieces (Linux without ANY_LAYOUT).
            let rest = len - HDR_LEN;
            (0..n - 1).map(|i| HDR_LEN + rest * i / (n - 1)).collect()
        } else {
            Vec::new()
        };
        cuts.sort_unstable();
        let wmask = if layout & 0x10 != 0 { inp.u8() } else { 0 };
        let mut descs = Vec::with_capacity(n + 1);
        let mut start = 0;
        for (i, end) in cuts.into_iter().chain([len]).enumerate() {
            let flags = if wmask & (1 << i) != 0 { F_WRITE } else { 0 };
            descs.push((addr + start as u64, (end - start) as u32, flags));
            start = end;
        }
        if layout & 0x40 != 0 {
            let flags = if wmask & 0x80 != 0 { F_WRITE } else { 0 };
            descs.push((addr + len as u64, 0, flags));
        }
        let head = if layout & 8 != 0 {
            let table = self.alloc.alloc(16 * descs.len());
            self.tx.write_indirect(self.mem, table, &descs)
        } else {
            self.tx.write_chain(self.mem, &descs)
        };
        // The same chain made available again: fills a batch cheaply, and is what a driver
        // that reuses a head still in flight does.
        let repeat = if layout & 0x20 != 0 { 1 + usize::from(inp.u8()) } else { 1 };
        for _ in 0..repeat {
            self.tx.push_avail(self.mem, head);
        }
        log!("TX frame: {h:?}, {} bytes, descriptors {descs:x?}, head {head} x{repeat}", payload.len());
    }

    fn rx_buffers(&mut self, inp: &mut Input<'_>) {
        let n = 1 + inp.u8() % 32;
        let len = match inp.u8() {
            // Mergeable buffers as Linux posts them.
            0..=0x3f => 4096,
            // "Big packets" without mergeable buffers.
            0x40..=0x5f => FRAME_BUF,
            0x60..=0x7f => HDR_LEN + 1514,
            0x80..=0x8f => HDR_LEN,
            0x90..=0x9f => 0,
            _ => usize::from(inp.u16()),
        };
        let shape = inp.u8();
        let parts = 1 + usize::from(shape & 3);
        let flags = if shape & 0x80 != 0 { 0 } else { F_WRITE };
        for _ in 0..n {
            let addr = if shape & 0x20 != 0 { MEM_SIZE - len as u64 / 2 } else { self.alloc.alloc(len) };
            let descs = if shape & 0x10 != 0 && len > HDR_LEN {
                // The header in a buffer of its own.
                let mut d = vec![(addr, HDR_LEN as u32, flags)];
                d.extend(split(addr + HDR_LEN as u64, len - HDR_LEN, parts, flags));
                d
            } else {
                split(addr, len, parts, flags)
            };
            let head = if shape & 0x40 != 0 {
                let table = self.alloc.alloc(16 * descs.len());
                self.rx.write_indirect(self.mem, table, &descs)
            } else {
                self.rx.write_chain(self.mem, &descs)
            };
            self.rx.push_avail(self.mem, head);
        }
        log!("RX buffers: {n} x {len} bytes, shape {shape:#x}");
    }

    /// Frames for the guest arrive at the tap (header first, as the kernel writes them).
    fn tap_frames(&mut self, inp: &mut Input<'_>) {
        let n = 1 + inp.u8() % 8;
        let len = match inp.u8() % 8 {
            0 => HDR_LEN + 60,
            1 => HDR_LEN + 1514,
            // A 64 KiB GSO frame, and more than the device reads (truncated).
            2 => FRAME_BUF,
            3 => FRAME_BUF + 1 + usize::from(inp.u8()),
            // Runts around the header's size.
            4 => usize::from(inp.u8()) % (HDR_LEN + 3),
            5 => HDR_LEN + usize::from(inp.u16()),
            _ => HDR_LEN + 9014,
        };
        let hsel = inp.u8();
        let mut hdr = [0u8; HDR_LEN];
        match hsel % 4 {
            0 => {}
            1 => {
                // What the kernel writes given the offloads the guest accepted.
                let t = self.tun_offloads;
                let h = if t & libc::TUN_F_TSO4 != 0 && len > HDR_LEN + 1514 {
                    NetHdr {
                        flags: NEEDS_CSUM,
                        gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
                        hdr_len: 66,
                        gso_size: 1448,
                        csum_start: 34,
                        csum_offset: 16,
                        num_buffers: 0,
                    }
                } else if t & libc::TUN_F_CSUM != 0 {
                    NetHdr { flags: VIRTIO_NET_HDR_F_DATA_VALID as u8, ..Default::default() }
                } else {
                    NetHdr::default()
                };
                h.write(&mut hdr);
            }
            _ => {
                let b = inp.bytes(HDR_LEN);
                hdr[..b.len()].copy_from_slice(b);
            }
        }
        let mut frame = pattern(len);
        let h = len.min(HDR_LEN);
        frame[..h].copy_from_slice(&hdr[..h]);
        for _ in 0..n {
            if self.tap.queued_bytes + len > TAP_QUEUE_BYTES {
                break;
            }
            self.tap.queued_bytes += len;
            self.tap.incoming.push_back(frame.clone());
        }
        self.tap_in_edge = true;
        log!("tap frames: {n} x {len} bytes, header {hdr:x?}");
    }

    fn tap_mode(&mut self, inp: &mut Input<'_>) {
        let m = inp.u8();
        let was_blocked = self.tap.send_mode == SendMode::WouldBlock;
        self.tap.send_mode = match m & 3 {
            0 => SendMode::Ok,
            1 => SendMode::WouldBlock,
            2 => SendMode::Fail,
            _ => self.tap.send_mode,
        };
        self.tap.recv_fails = m & 4 != 0;
        if was_blocked && self.tap.send_mode != SendMode::WouldBlock {
            self.tap_out_edge = true;
        }
        log!("tap: send {:?}, recv fails {}", self.tap.send_mode, self.tap.recv_fails);
    }

    /// Fuzzer bytes at an offset into one of the rings (a write anywhere rarely lands there).
    fn ring_write(&mut self, inp: &mut Input<'_>) {
        let sel = inp.u8();
        let ring = if sel & 1 == 0 { &self.tx } else { &self.rx };
        let base = match (sel >> 1) % 3 {
            0 => ring.desc,
            1 => ring.avail,
            _ => ring.used,
        };
        let at = base + u64::from(inp.u16()) % (16 * u64::from(ring.size) + 8);
        let n = usize::from(inp.u8() % 16) + 1;
        let _ = self.mem.write_slice(inp.bytes(n), GuestAddress(at));
        log!("ring write at {at:#x}");
    }

    /// The driver moves an avail index (jumps past what a ring can hold, goes back) or the
    /// used_event the device reads with EVENT_IDX.
    fn indices(&mut self, inp: &mut Input<'_>) {
        let sel = inp.u8();
        let (ring, q) = if sel & 1 == 0 { (&mut self.tx, &self.txq) } else { (&mut self.rx, &self.rxq) };
        let pick = (sel >> 1) % 4;
        if sel & 0x80 != 0 {
            let v = match pick {
                0 => q.next_used(),
                1 => q.next_used().wrapping_sub(1),
                2 => q.next_used().wrapping_add(1),
                _ => inp.u16(),
            };
            ring.set_used_event(self.mem, v);
            log!("used_event {v}");
        } else {
            let v = match pick {
                0 => q.next_avail().wrapping_add(ring.size).wrapping_add(1),
                1 => q.next_avail().wrapping_add(ring.size),
                2 => ring.avail_idx().wrapping_sub(1),
                _ => inp.u16(),
            };
            ring.set_avail_idx(self.mem, v);
            log!("avail idx {v} (next_avail {})", q.next_avail());
        }
    }

    fn command(&mut self, inp: &mut Input<'_>) {
        match inp.u8() % 16 {
            0..=4 => self.tx_frame(inp),
            5 => {
                self.tx.raw_chain(self.mem, inp);
                log!("raw TX chain, head {}", self.tx.last_head);
            }
            6 | 7 => self.rx_buffers(inp),
            8 => {
                self.rx.raw_chain(self.mem, inp);
                log!("raw RX chain, head {}", self.rx.last_head);
            }
            9 => self.tap_frames(inp),
            10 => {
                mem_write(self.mem, inp);
                log!("memory write");
            }
            11 => self.ring_write(inp),
            12 => self.indices(inp),
            13 => self.tap_mode(inp),
            _ => self.pass(inp),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let acked = acked_features(inp.u8());
    // The driver may pick any power of two up to the device's maximum (256 down to 1).
    let sizes = inp.u8();
    let size = |b: u8| QUEUE_SIZE >> (b & 0xf).min(8);
    let mem = guest_memory();
    let (tx, mut txq) = Ring::new(&mem, TX_RING, size(sizes));
    let (rx, mut rxq) = Ring::new(&mem, RX_RING, size(sizes >> 4));
    let event_idx = acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
    txq.set_event_idx(event_idx);
    rxq.set_event_idx(event_idx);
    let offloads = tx_offloads(acked);
    let mergeable = acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
    log!(
        "features {acked:#x}: {offloads:?}, mergeable {mergeable}, event_idx {event_idx}, sizes {}/{}",
        tx.size,
        rx.size
    );
    let tap = Tap {
        incoming: VecDeque::new(),
        queued_bytes: 0,
        reads: 0,
        sends: 0,
        send_mode: SendMode::Ok,
        recv_fails: false,
        offloads,
    };
    let mut run = Run {
        mem: &mem,
        tx,
        txq,
        rx,
        rxq,
        alloc: Alloc::default(),
        tap,
        offloads,
        tun_offloads: tap_offloads(acked),
        mergeable,
        rx_frame: RxFrame::default(),
        tx_buf: Vec::with_capacity(FRAME_BUF),
        // As run_worker starts.
        tap_readable: true,
        tx_blocked: false,
        rx_more: true,
        tx_more: false,
        tap_in_edge: false,
        tap_out_edge: false,
    };
    for _ in 0..MAX_COMMANDS {
        if inp.is_empty() {
            break;
        }
        run.command(&mut inp);
    }
    // Everything queued gets a turn with every event, then the polls that follow.
    run.turns(0, 4);
});

/// `net/mod.rs`'s `kick_on_next_post`: notification on, `avail_event` at what the guest has
/// posted (with EVENT_IDX); whether it posted since `seen`.
fn kick_on_next_post(q: &mut Queue, mem: &Mem, seen: u16) -> bool {
    if q.enable_notification(mem).is_err() {
        return false;
    }
    if q.event_idx_enabled() {
        if let Some(at) = q.used_ring().checked_add(4 + 8 * u64::from(q.size())) {
            let _ = mem.store(seen.to_le(), GuestAddress(at), Ordering::Release);
        }
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    q.avail_idx(mem, Ordering::Acquire).is_ok_and(|i| i.0 != seen)
}
