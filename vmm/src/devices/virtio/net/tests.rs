//! The queues driven as a guest driver would (and as a hostile one might), through mock split
//! queues on guest memory, against a simulated tap. No KVM, no tap device needed.

use std::collections::VecDeque;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::header::{NetHdr, HDR_LEN};
use super::queues::{process_rx, process_tx, RxFrame, BATCH, FRAME_BUF};
use super::*;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const ALL: TxOffloads = TxOffloads { csum: true, tso4: true, tso6: true, ecn: true };

fn mem() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A tap that holds frames to receive and records what is sent.
#[derive(Default)]
struct FakeTap {
    incoming: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
    would_block: bool,
    reads: usize,
}

impl Backend for FakeTap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let Some(f) = self.incoming.pop_front() else { return Ok(None) };
        self.reads += 1;
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(Some(n))
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.would_block {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.sent.push(frame.to_vec());
        Ok(())
    }
}

/// A frame as the tap hands it over: a zeroed header, then `len` payload bytes.
fn tap_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

/// Writes a guest TX frame (header + 60-byte packet) at `addr`; returns its bytes.
fn guest_frame(m: &GuestMem, addr: u64, h: NetHdr, payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN + payload];
    h.write(&mut f);
    for (i, b) in f[HDR_LEN..].iter_mut().enumerate() {
        *b = i as u8;
    }
    m.write_slice(&f, GuestAddress(addr)).unwrap();
    f
}

fn used_lens(vq: &MockSplitQueue<GuestMem>) -> Vec<u32> {
    let n = vq.used().idx().load();
    (0..n).map(|i| vq.used().ring().ref_at(i as usize).unwrap().load().len()).collect()
}

#[test]
fn tx_sends_a_frame_split_across_descriptors() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let f = guest_frame(&m, 0x10_0000, NetHdr::default(), 60);
    // The header alone, then the packet in two pieces.
    vq.build_desc_chain(&[desc(0x10_0000, 12, 0, 0), desc(0x10_000c, 30, 0, 0), desc(0x10_002a, 30, 0, 0)])
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap::default();
    let out = process_tx(&mut q, &m, &mut tap, ALL, &mut Vec::new());
    assert_eq!((out.completed, out.dropped, out.blocked), (1, 0, false));
    assert_eq!(tap.sent, vec![f]);
    assert_eq!(used_lens(&vq), vec![0]);
}

#[test]
fn tx_drops_hostile_chains_and_goes_on() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 32);
    guest_frame(&m, 0x10_0000, NetHdr::default(), 60);
    guest_frame(&m, 0x20_0000, NetHdr { flags: 2, ..Default::default() }, 60);
    guest_frame(&m, 0x30_0000, NetHdr { gso_type: 3, flags: 1, gso_size: 10, ..Default::default() }, 60);
    let good = guest_frame(&m, 0x40_0000, NetHdr::default(), 60);
    vq.build_multiple_desc_chains(&[
        // A device-writable descriptor in a TX chain.
        desc(0x10_0000, 72, F_WRITE, 0),
        // A buffer outside guest memory.
        desc(0xffff_0000_0000, 72, 0, 0),
        // Longer than any frame: two descriptors of 40000 bytes.
        desc(0x50_0000, 40_000, F_NEXT, 3),
        desc(0x60_0000, 40_000, 0, 0),
        // Too short for a header and an Ethernet header.
        desc(0x10_0000, 20, 0, 0),
        // Bad headers: DATA_VALID on TX, UFO never offered.
        desc(0x20_0000, 72, 0, 0),
        desc(0x30_0000, 72, 0, 0),
        // A 4 GiB length.
        desc(0x10_0000, u32::MAX, 0, 0),
        // And a good one after all of them.
        desc(0x40_0000, 72, 0, 0),
    ])
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap::default();
    let out = process_tx(&mut q, &m, &mut tap, ALL, &mut Vec::new());
    assert_eq!((out.completed, out.dropped), (8, 7));
    assert_eq!(tap.sent, vec![good]);
    assert_eq!(used_lens(&vq), vec![0; 8]);
}

#[test]
fn tx_keeps_the_frame_while_the_tap_would_block() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let f = guest_frame(&m, 0x10_0000, NetHdr::default(), 60);
    vq.build_desc_chain(&[desc(0x10_0000, 72, 0, 0)]).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap { would_block: true, ..Default::default() };
    let out = process_tx(&mut q, &m, &mut tap, ALL, &mut Vec::new());
    assert!(out.blocked);
    assert_eq!(out.completed, 0);
    assert!(used_lens(&vq).is_empty(), "nothing completed while blocked");
    tap.would_block = false;
    let out = process_tx(&mut q, &m, &mut tap, ALL, &mut Vec::new());
    assert_eq!((out.completed, out.blocked), (1, false));
    assert_eq!(tap.sent, vec![f]);
}

#[test]
fn tx_does_at_most_a_batch_per_call() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 256);
    guest_frame(&m, 0x10_0000, NetHdr::default(), 60);
    let chains: Vec<RawDescriptor> = (0..256).map(|_| desc(0x10_0000, 72, 0, 0)).collect();
    vq.build_multiple_desc_chains(&chains).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap::default();
    let out = process_tx(&mut q, &m, &mut tap, ALL, &mut Vec::new());
    assert_eq!(out.completed, BATCH);
    assert!(out.more);
}

#[test]
fn rx_spreads_a_big_frame_over_mergeable_buffers() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    vq.build_multiple_desc_chains(&[
        desc(0x10_0000, 1500, F_WRITE, 0),
        desc(0x20_0000, 1500, F_WRITE, 0),
        desc(0x30_0000, 1500, F_WRITE, 0),
        desc(0x40_0000, 1500, F_WRITE, 0),
    ])
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let f = tap_frame(4000 - HDR_LEN, 7);
    let mut tap = FakeTap { incoming: VecDeque::from([f.clone()]), ..Default::default() };
    let out = process_rx(&mut q, &m, &mut tap, &mut RxFrame::default(), true);
    assert_eq!((out.delivered, out.drained), (1, true));
    assert_eq!(used_lens(&vq), vec![1500, 1500, 1000]);
    let mut got = vec![0u8; 4000];
    m.read_slice(&mut got[..1500], GuestAddress(0x10_0000)).unwrap();
    m.read_slice(&mut got[1500..3000], GuestAddress(0x20_0000)).unwrap();
    m.read_slice(&mut got[3000..], GuestAddress(0x30_0000)).unwrap();
    assert_eq!(NetHdr::parse(&got).unwrap().num_buffers, 3);
    assert_eq!(got[HDR_LEN..], f[HDR_LEN..]);
}

#[test]
fn rx_without_buffers_holds_one_frame_and_reads_no_more() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap { incoming: (0..100).map(|i| tap_frame(100, i)).collect(), ..Default::default() };
    let mut frame = RxFrame::default();
    for _ in 0..10 {
        let out = process_rx(&mut q, &m, &mut tap, &mut frame, true);
        assert!(out.out_of_buffers);
        assert_eq!(out.delivered, 0);
    }
    assert_eq!(tap.reads, 1, "a guest that posts no buffers makes the device hold one frame, no more");
    assert!(frame.pending());
    // Buffers come: the waiting frame goes first, then the rest.
    vq.add_desc_chains(&[desc(0x10_0000, 2048, F_WRITE, 0), desc(0x20_0000, 2048, F_WRITE, 0)], 0).unwrap();
    let out = process_rx(&mut q, &m, &mut tap, &mut frame, true);
    assert_eq!((out.delivered, out.out_of_buffers), (2, true));
    let mut got = vec![0u8; 112];
    m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(got[HDR_LEN..], tap_frame(100, 0)[HDR_LEN..]);
}

#[test]
fn rx_puts_buffers_back_until_a_frame_fits() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    vq.build_multiple_desc_chains(&[desc(0x10_0000, 1000, F_WRITE, 0)]).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap { incoming: VecDeque::from([tap_frame(2000, 1)]), ..Default::default() };
    let mut frame = RxFrame::default();
    let out = process_rx(&mut q, &m, &mut tap, &mut frame, true);
    assert!(out.out_of_buffers);
    assert!(used_lens(&vq).is_empty(), "a partial placement is undone");
    vq.add_desc_chains(&[desc(0x20_0000, 1500, F_WRITE, 0)], 1).unwrap();
    let out = process_rx(&mut q, &m, &mut tap, &mut frame, true);
    assert_eq!(out.delivered, 1);
    assert_eq!(used_lens(&vq), vec![1000, 1012]);
}

#[test]
fn rx_without_mergeable_drops_a_frame_too_big_for_one_buffer() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    vq.build_multiple_desc_chains(&[desc(0x10_0000, 1000, F_WRITE, 0)]).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let small = tap_frame(500, 2);
    let mut tap =
        FakeTap { incoming: VecDeque::from([tap_frame(2000, 1), small.clone()]), ..Default::default() };
    let out = process_rx(&mut q, &m, &mut tap, &mut RxFrame::default(), false);
    assert_eq!((out.dropped, out.delivered), (1, 1));
    // The buffer went to the frame that fits.
    assert_eq!(used_lens(&vq), vec![512]);
    let mut got = vec![0u8; 512];
    m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(NetHdr::parse(&got).unwrap().num_buffers, 1);
    assert_eq!(got[HDR_LEN..], small[HDR_LEN..]);
}

#[test]
fn rx_hostile_buffers_lose_the_frame_not_the_queue() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    vq.build_multiple_desc_chains(&[
        // Device-readable, outside memory, then a good one.
        desc(0x10_0000, 2048, 0, 0),
        desc(0xffff_0000_0000, 2048, F_WRITE, 0),
        desc(0x20_0000, 2048, F_WRITE, 0),
    ])
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let frames = (0..3).map(|i| tap_frame(100, i)).collect();
    let mut tap = FakeTap { incoming: frames, ..Default::default() };
    let out = process_rx(&mut q, &m, &mut tap, &mut RxFrame::default(), true);
    assert_eq!((out.dropped, out.delivered), (2, 1));
    assert_eq!(used_lens(&vq), vec![0, 0, 112]);
}

#[test]
fn rx_runt_frames_from_the_host_are_dropped() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    vq.build_multiple_desc_chains(&[desc(0x10_0000, 2048, F_WRITE, 0)]).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap =
        FakeTap { incoming: VecDeque::from([vec![0u8; 5], tap_frame(64, 0)]), ..Default::default() };
    let out = process_rx(&mut q, &m, &mut tap, &mut RxFrame::default(), true);
    assert_eq!((out.dropped, out.delivered), (1, 1));
}

#[test]
fn a_detached_device_completes_what_the_guest_sends_and_receives_nothing() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    guest_frame(&m, 0x10_0000, NetHdr::default(), 60);
    vq.build_desc_chain(&[desc(0x10_0000, 72, 0, 0)]).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut wire = Wire::Detached;
    // The guest gets its buffer back (a full TX ring would stall it); the frame goes nowhere.
    let out = process_tx(&mut q, &m, &mut wire, ALL, &mut Vec::new());
    assert_eq!((out.completed, out.dropped, out.blocked), (1, 0, false));
    assert_eq!(used_lens(&vq), vec![0]);
    let mut buf = [0u8; 64];
    assert!(matches!(wire.recv(&mut buf), Ok(None)));
    // A detached device looks to the guest like any other: same features and config.
    let d = Net::new(None, [2, 0x68, 0x75, 0x73, 0x6b, 0], None);
    assert_eq!(d.avail_features(), features(None));
    assert_eq!(&d.config()[..6], &[2, 0x68, 0x75, 0x73, 0x6b, 0]);
}

#[test]
fn features_config_and_offloads() {
    let dev_features = features(Some(1400));
    assert!(dev_features & bit(VIRTIO_NET_F_MTU) != 0);
    assert!(features(None) & bit(VIRTIO_NET_F_MTU) == 0);
    // Segmentation to the guest only with checksum offload.
    assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    let all = tap_offloads(dev_features);
    assert_eq!(all, libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN);
    assert_eq!(tx_offloads(VIRTIO_F_VERSION_1), TxOffloads::default());
    assert_eq!(tx_offloads(dev_features), ALL);
    const { assert!(FRAME_BUF >= 65_562, "a 64 KiB GSO frame with its headers fits") };
}

/// The worker's loops over queues a hostile (or short) ring makes unprocessable: they must
/// return, not spin (found by the net_tx fuzz target).
fn returns_within(what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok(), "{what} spins");
}

fn worker(m: &GuestMem, rxq: Queue, txq: Queue, tap: FakeTap, event_idx: bool) -> NetWorker<FakeTap> {
    let (mut rxq, mut txq) = (rxq, txq);
    rxq.set_event_idx(event_idx);
    txq.set_event_idx(event_idx);
    NetWorker {
        mem: m.clone(),
        rxq,
        txq,
        tap,
        offloads: ALL,
        mergeable: true,
        rx_frame: RxFrame::default(),
        tx_buf: Vec::with_capacity(FRAME_BUF),
        tap_readable: true,
        tx_blocked: false,
    }
}

#[test]
fn worker_loops_end_on_an_avail_index_too_far_ahead() {
    let m = mem();
    let (rx_vq, tx_vq) = (MockSplitQueue::new(&m, 4), MockSplitQueue::create(&m, GuestAddress(0x80_0000), 4));
    let (rxq, txq) = (rx_vq.create_queue().unwrap(), tx_vq.create_queue().unwrap());
    // Six entries claimed on four-entry rings: virtio-queue yields no chain.
    rx_vq.avail().idx().store(6);
    tx_vq.avail().idx().store(6);
    let tap = FakeTap { incoming: VecDeque::from([tap_frame(100, 1)]), ..Default::default() };
    let mut w = worker(&m, rxq, txq, tap, true);
    returns_within("tx", move || {
        let _ = w.tx();
        let _ = w.rx();
    });
}

#[test]
fn rx_waits_for_the_next_post_when_the_buffers_are_too_few() {
    let m = mem();
    let (rx_vq, tx_vq) =
        (MockSplitQueue::new(&m, 16), MockSplitQueue::create(&m, GuestAddress(0x80_0000), 16));
    rx_vq.build_multiple_desc_chains(&[desc(0x10_0000, 4096, F_WRITE, 0)]).unwrap();
    let (rxq, txq) = (rx_vq.create_queue().unwrap(), tx_vq.create_queue().unwrap());
    let tap = FakeTap { incoming: VecDeque::from([tap_frame(60_000, 2)]), ..Default::default() };
    let mut w = worker(&m, rxq, txq, tap, true);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = w.rx();
        let _ = tx.send((r, w));
    });
    let ((used, more), w) = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("rx spins");
    assert!(!used && !more);
    assert!(w.rx_frame.pending(), "the frame waits for buffers");
    // The guest is asked to kick at its next post (avail_event = what it has posted, 1), not
    // at next_avail (0), which it is past already.
    let at = w.rxq.used_ring() + 4 + 8 * u64::from(w.rxq.size());
    assert_eq!(m.read_obj::<u16>(GuestAddress(at)).unwrap(), 1);
}
