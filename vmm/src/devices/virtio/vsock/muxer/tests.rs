//! The muxer driven by a simulated guest driver (split queues on real guest memory) against
//! real Unix sockets.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{ActivateContext, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

const CID: u64 = 3;
const QSIZE: u16 = 256;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const TX_RING: u64 = 0x1_0000;
const RX_RING: u64 = 0x2_0000;
const EV_RING: u64 = 0x3_0000;
const TX_BUFS: u64 = 0x10_0000;
const RX_BUFS: u64 = 0x40_0000;
const RX_BUF_LEN: u32 = 4096;
/// Headers posted by [`Guest::post_tx`], one slot per descriptor.
const TX_SLOTS: u64 = 0xC0_0000;

fn mem() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// One split queue as a driver lays it out: descriptor table, available ring, used ring 4-byte
/// aligned after it. Not `MockSplitQueue`'s layout, whose used ring overlaps the available
/// ring's upper half (see vmm/fuzz/src/lib.rs): the flood tests go round the whole ring.
struct DriverRing<'a> {
    mem: &'a GuestMem,
    desc: u64,
    avail: u64,
    used: u64,
}

impl<'a> DriverRing<'a> {
    fn new(mem: &'a GuestMem, base: u64) -> (Self, Queue) {
        let desc = base;
        let avail = desc + 16 * u64::from(QSIZE);
        let used = (avail + 6 + 2 * u64::from(QSIZE) + 3) & !3;
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        (Self { mem, desc, avail, used }, q)
    }

    fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Chains made available and not used yet.
    fn in_flight(&self) -> u16 {
        self.avail_idx().wrapping_sub(self.used_idx())
    }

    fn set_desc(&self, slot: u16, d: SplitDescriptor) {
        let at = self.desc + 16 * u64::from(slot % QSIZE);
        self.mem.write_obj(RawDescriptor::from(d), GuestAddress(at)).unwrap();
    }

    /// Makes the chain at `head` the next available one.
    fn push_avail(&self, head: u16) {
        let idx = self.avail_idx();
        let at = self.avail + 4 + 2 * u64::from(idx % QSIZE);
        self.mem.write_obj(head % QSIZE, GuestAddress(at)).unwrap();
        self.mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2)).unwrap();
    }

    /// Used ring entry `i` (taken modulo the queue size).
    fn used_elem(&self, i: u16) -> VirtqUsedElem {
        let at = self.used + 4 + 8 * u64::from(i % QSIZE);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}

/// A simulated guest driver: TX and RX queues on real guest memory.
struct Guest<'a> {
    mem: &'a GuestMem,
    txr: DriverRing<'a>,
    rxr: DriverRing<'a>,
    tx: Queue,
    rx: Queue,
    tx_next: u16,
    tx_buf: u64,
    rx_next: u16,
    rx_used_seen: u16,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMem) -> Self {
        let (txr, tx) = DriverRing::new(mem, TX_RING);
        let (rxr, rx) = DriverRing::new(mem, RX_RING);
        Self { mem, txr, rxr, tx, rx, tx_next: 0, tx_buf: TX_BUFS, rx_next: 0, rx_used_seen: 0 }
    }

    fn hdr(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
        PacketHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Default::default()
        }
    }

    /// Makes `descs` (linked in consecutive table slots) the next TX chain.
    fn add_tx_chain(&mut self, descs: &[(u64, u32, u16)]) {
        let head = self.tx_next;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let next = self.tx_next.wrapping_add(1) % QSIZE;
            let flags = if i + 1 < descs.len() { flags | F_NEXT } else { flags };
            self.txr.set_desc(self.tx_next, SplitDescriptor::new(addr, len, flags, next));
            self.tx_next = next;
        }
        self.txr.push_avail(head);
    }

    /// Queues a raw TX chain: header bytes and optional payload, as separate descriptors.
    fn send_raw(&mut self, hdr: &[u8], payload: &[u8]) {
        let h_addr = self.tx_buf;
        self.mem.write_slice(hdr, GuestAddress(h_addr)).unwrap();
        let p_addr = h_addr + 0x1000;
        self.mem.write_slice(payload, GuestAddress(p_addr)).unwrap();
        self.tx_buf += 0x1000 + payload.len() as u64 + 0x1000;
        let mut descs = vec![(h_addr, hdr.len() as u32, 0)];
        if !payload.is_empty() {
            descs.push((p_addr, payload.len() as u32, 0));
        }
        self.add_tx_chain(&descs);
    }

    fn send(&mut self, h: PacketHeader, payload: &[u8]) {
        let h = PacketHeader { len: payload.len() as u32, ..h };
        self.send_raw(h.as_slice(), payload);
    }

    /// Posts a header-only TX packet, in a buffer of its ring slot, so any number can go
    /// through (`send` takes fresh memory each time). False while the ring is full.
    fn post_tx(&mut self, h: PacketHeader) -> bool {
        if self.txr.in_flight() >= QSIZE {
            return false;
        }
        let addr = TX_SLOTS + u64::from(self.tx_next % QSIZE) * 64;
        self.mem.write_obj(h, GuestAddress(addr)).unwrap();
        self.add_tx_chain(&[(addr, HDR_LEN as u32, 0)]);
        true
    }

    /// TX chains the device has used so far.
    fn tx_used(&self) -> u16 {
        self.txr.used_idx()
    }

    /// Makes one RX chain of `d` available.
    fn add_rx_desc(&mut self, d: SplitDescriptor) {
        self.rxr.set_desc(self.rx_next, d);
        self.rxr.push_avail(self.rx_next);
        self.rx_next = self.rx_next.wrapping_add(1) % QSIZE;
    }

    /// Posts up to `n` RX buffers (fewer if the ring fills); returns how many.
    fn give_rx_buffers(&mut self, n: u16) -> u16 {
        let mut posted = 0;
        while posted < n && self.rxr.in_flight() < QSIZE {
            let addr = RX_BUFS + u64::from(self.rx_next) * u64::from(RX_BUF_LEN);
            self.add_rx_desc(SplitDescriptor::new(addr, RX_BUF_LEN, F_WRITE, 0));
            posted += 1;
        }
        posted
    }

    /// Runs the device side once: TX, host events, RX.
    fn pump(&mut self, m: &mut Muxer) {
        m.process_tx(&mut self.tx, self.mem);
        m.handle_events();
        m.process_rx(&mut self.rx, self.mem);
    }

    /// Packets the device put in RX buffers since last call.
    fn received(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_used_seen != self.rxr.used_idx() {
            let e = self.rxr.used_elem(self.rx_used_seen);
            let addr = RX_BUFS + u64::from(e.id()) * u64::from(RX_BUF_LEN);
            let h: PacketHeader = self.mem.read_obj(GuestAddress(addr)).unwrap();
            let mut data = vec![0u8; (e.len() as usize).saturating_sub(HDR_LEN)];
            self.mem.read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64)).unwrap();
            out.push((h, data));
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
        }
        out
    }
}

fn sock_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("husk-vsock-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wait_readable(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// Everything the peer sends until it closes.
fn read_to_end(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn guest_connects_to_host_listener_and_data_flows_both_ways() {
    let dir = sock_dir("g2h");
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_1234", path.display())).unwrap();
    let mut m = Muxer::new(CID, &path).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    g.give_rx_buffers(8);
    g.send(Guest::hdr(OP_REQUEST, 5000, 1234), &[]);
    g.pump(&mut m);
    let pkts = g.received();
    assert_eq!(pkts.len(), 1);
    let resp = pkts[0].0;
    assert_eq!(
        ({ resp.op }, { resp.src_port }, { resp.dst_port }, { resp.dst_cid }),
        (OP_RESPONSE, 1234, 5000, CID)
    );
    let (mut host, _) = listener.accept().unwrap();

    g.send(Guest::hdr(OP_RW, 5000, 1234), b"ping from guest");
    g.pump(&mut m);
    assert_eq!(wait_readable(&mut host, 15), b"ping from guest");

    host.write_all(b"pong from host").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.pump(&mut m);
    let pkts = g.received();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!({ pkts[0].0.op }, OP_RW);
    assert_eq!(pkts[0].1, b"pong from host");
    assert_eq!({ pkts[0].0.fwd_cnt }, 15, "fwd_cnt reports delivered guest bytes");

    // Host closes: the guest is told no more data will come.
    drop(host);
    std::thread::sleep(Duration::from_millis(20));
    g.pump(&mut m);
    let pkts = g.received();
    assert!(pkts.iter().any(|(h, _)| h.op == OP_SHUTDOWN), "{pkts:?}");
    // Guest finishes with RST: the connection is gone.
    g.send(Guest::hdr(OP_RST, 5000, 1234), &[]);
    g.pump(&mut m);
    assert_eq!(m.connection_count(), 0);
    drop(m);
    assert!(!path.exists(), "socket removed with the device");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn host_connects_into_guest() {
    let dir = sock_dir("h2g");
    let path = dir.join("v.sock");
    let mut m = Muxer::new(CID, &path).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    g.give_rx_buffers(8);
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.pump(&mut m);
    let pkts = g.received();
    assert_eq!(pkts.len(), 1);
    let req = pkts[0].0;
    assert_eq!(({ req.op }, { req.dst_port }), (OP_REQUEST, 52));
    let local = req.src_port;
    assert!(local >= FIRST_LOCAL_PORT);
    g.send(Guest::hdr(OP_RESPONSE, 52, local), &[]);
    g.pump(&mut m);
    let ok = format!("OK {local}\n");
    assert_eq!(wait_readable(&mut client, ok.len()), ok.as_bytes());
    g.send(Guest::hdr(OP_RW, 52, local), b"hi host");
    g.pump(&mut m);
    assert_eq!(wait_readable(&mut client, 7), b"hi host");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn refused_connections_get_rst() {
    let dir = sock_dir("refused");
    let path = dir.join("v.sock");
    let mut m = Muxer::new(CID, &path).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    g.give_rx_buffers(8);
    // Guest to a host port nobody listens on.
    g.send(Guest::hdr(OP_REQUEST, 5000, 999), &[]);
    g.pump(&mut m);
    let pkts = g.received();
    assert_eq!({ pkts[0].0.op }, OP_RST);
    // Host to a guest port nobody listens on: the guest answers RST, the client sees EOF.
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 77\n").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.pump(&mut m);
    let req = g.received()[0].0;
    g.send(Guest::hdr(OP_RST, 77, req.src_port), &[]);
    g.pump(&mut m);
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(client.read(&mut b).unwrap(), 0, "client sees the refusal as EOF");
    // A malformed handshake line is answered and closed.
    let mut bad = UnixStream::connect(&path).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.pump(&mut m);
    let mut reply = String::new();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bad.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("ERR "), "{reply}");
    assert_eq!(m.connection_count(), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn malformed_handshakes_get_err_and_close() {
    let dir = sock_dir("bad-hs");
    let path = dir.join("v.sock");
    let mut m = Muxer::new(CID, &path).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    g.give_rx_buffers(8);
    // One byte over, and nothing more: a close with unread data would reset the stream and
    // the client might see ECONNRESET instead of the reply.
    let too_long = vec![b'7'; husk_proto::handshake::MAX_LINE + 1];
    // (what the client sends, whether it then ends its side)
    let cases: [(&[u8], bool); 7] = [
        (b"CONNECT -1\n", false),
        (b"CONNECT 1 2\n", false),
        (b"connect 5\n", false),
        (b"CONNECT 05\n", false),
        (b"STDIO s1\n", false),
        (b"CONNECT 5", true),
        (&too_long, false),
    ];
    for (line, then_eof) in cases {
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(line).unwrap();
        if then_eof {
            client.shutdown(Shutdown::Write).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
        g.pump(&mut m);
        let mut reply = String::new();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        client.read_to_string(&mut reply).unwrap();
        let body = reply.strip_suffix('\n').unwrap_or_else(|| panic!("unterminated {reply:?}"));
        assert!(
            matches!(Reply::parse_line(body.as_bytes()), Ok(Reply::Err(_))),
            "{:?}: {reply:?}",
            String::from_utf8_lossy(line)
        );
    }
    assert!(g.received().is_empty(), "the guest never hears of them");
    assert_eq!(m.connection_count(), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn host_data_respects_guest_credit() {
    let dir = sock_dir("credit");
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_7", path.display())).unwrap();
    let mut m = Muxer::new(CID, &path).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    g.give_rx_buffers(16);
    let mut req = Guest::hdr(OP_REQUEST, 100, 7);
    req.buf_alloc = 10;
    g.send(req, &[]);
    g.pump(&mut m);
    g.received();
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[7u8; 100]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.pump(&mut m);
    let got: usize = g.received().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 10, "no more than the guest's buf_alloc");
    // The guest consumed the 10 bytes.
    let mut upd = Guest::hdr(OP_CREDIT_UPDATE, 100, 7);
    upd.buf_alloc = 10;
    upd.fwd_cnt = 10;
    g.send(upd, &[]);
    g.pump(&mut m);
    let got: usize = g.received().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 10);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn hostile_packets_are_refused_without_harm() {
    let dir = sock_dir("hostile");
    let path = dir.join("v.sock");
    let _listener = UnixListener::bind(format!("{}_7", path.display())).unwrap();
    let mut m = Muxer::new(CID, &path).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    g.give_rx_buffers(64);
    g.send(Guest::hdr(OP_REQUEST, 100, 7), &[]);
    g.pump(&mut m);
    g.received();
    assert_eq!(m.connection_count(), 1);
    // Short header.
    g.send_raw(&[1, 2, 3], &[]);
    // Forged source CID: dropped silently.
    g.send(PacketHeader { src_cid: 99, ..Guest::hdr(OP_RW, 100, 7) }, b"x");
    // Unknown op, wrong type, RW longer than what follows, RW over the size limit.
    g.send(Guest::hdr(42, 100, 7), &[]);
    g.send(PacketHeader { type_: 2, ..Guest::hdr(OP_REQUEST, 101, 7) }, &[]);
    let lying = PacketHeader { len: 1000, ..Guest::hdr(OP_RW, 100, 7) };
    g.send_raw(lying.as_slice(), b"short");
    let huge = PacketHeader { len: u32::MAX, ..Guest::hdr(OP_RW, 100, 7) };
    g.send_raw(huge.as_slice(), b"x");
    // Data for a connection that does not exist.
    g.send(Guest::hdr(OP_RW, 555, 7), b"x");
    // Header descriptor pointing outside guest memory.
    g.add_tx_chain(&[(0xffff_ffff_0000, 44, 0)]);
    g.pump(&mut m);
    let pkts = g.received();
    assert!(pkts.iter().all(|(h, _)| h.op == OP_RST), "{pkts:?}");
    assert!(!pkts.iter().any(|(h, _)| h.dst_cid == 99), "no reply to a forged CID");
    assert_eq!(m.connection_count(), 0, "the lying RW reset the stream");
    // The device still works afterwards.
    g.send(Guest::hdr(OP_REQUEST, 200, 7), &[]);
    g.pump(&mut m);
    assert_eq!({ g.received()[0].0.op }, OP_RESPONSE);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unusable_rx_buffers_do_not_stall_host_data() {
    let dir = sock_dir("tiny-rx");
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_7", path.display())).unwrap();
    let mut m = Muxer::new(CID, &path).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    g.give_rx_buffers(1);
    g.send(Guest::hdr(OP_REQUEST, 100, 7), &[]);
    g.pump(&mut m);
    assert_eq!({ g.received()[0].0.op }, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(b"data").unwrap();
    // Host data is waiting and the guest offers buffers with no room for it: one
    // device-readable, one only a header long. Both are completed empty (this used to spin
    // in process_rx forever, handing the same buffer back and picking it again).
    g.add_rx_desc(SplitDescriptor::new(RX_BUFS + 0x10_0000, 4096, 0, 0));
    g.add_rx_desc(SplitDescriptor::new(RX_BUFS + 0x11_0000, HDR_LEN as u32, F_WRITE, 0));
    std::thread::sleep(Duration::from_millis(20));
    g.pump(&mut m);
    let used = g.rxr.used_idx();
    assert_eq!(used, 3);
    for i in 1..3 {
        assert_eq!(g.rxr.used_elem(i).len(), 0);
    }
    // The data still arrives once a real buffer comes.
    g.rx_used_seen = used;
    g.give_rx_buffers(1);
    g.pump(&mut m);
    let pkts = g.received();
    assert_eq!(({ pkts[0].0.op }, pkts[0].1.as_slice()), (OP_RW, b"data".as_slice()));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let dir = sock_dir("overrun");
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_7", path.display())).unwrap();
    let mut m = Muxer::new(CID, &path).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    g.give_rx_buffers(8);
    g.send(Guest::hdr(OP_REQUEST, 100, 7), &[]);
    g.pump(&mut m);
    g.received();
    // The host never reads: after BUF_ALLOC bytes (plus what the socket buffer took), more
    // data is a credit violation and the stream is reset; memory stays bounded.
    let (_host, _) = listener.accept().unwrap();
    let chunk = vec![1u8; MAX_PAYLOAD as usize];
    for _ in 0..64 {
        g.send(Guest::hdr(OP_RW, 100, 7), &chunk);
        g.pump(&mut m);
        if m.connection_count() == 0 {
            break;
        }
    }
    assert_eq!(m.connection_count(), 0);
    assert!(g.received().iter().any(|(h, _)| h.op == OP_RST));
    std::fs::remove_dir_all(dir).unwrap();
}

/// A packet the muxer refuses with an RST to its own key (`src_port` tells them apart): data
/// for no connection, a connect to a port nobody listens on, an unknown op.
fn refused(i: u32) -> PacketHeader {
    let src = 10_000 + i;
    match i % 3 {
        0 => Guest::hdr(OP_RW, src, 999),
        1 => Guest::hdr(OP_REQUEST, src, 999),
        _ => Guest::hdr(42, src, 999),
    }
}

/// Posts and pumps until TX stops moving; returns how many packets of `total` were posted.
fn flood_until_stalled(g: &mut Guest<'_>, m: &mut Muxer, mut sent: u32, total: u32) -> u32 {
    loop {
        while sent < total && g.post_tx(refused(sent)) {
            sent += 1;
        }
        let before = g.tx_used();
        g.pump(m);
        if g.tx_used() == before {
            return sent;
        }
    }
}

#[test]
fn refused_flood_without_rx_buffers_stops_at_the_backlog_and_resumes() {
    let dir = sock_dir("flood");
    let mut m = Muxer::new(CID, &dir.join("v.sock")).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    const TOTAL: u32 = 10_000;
    // No RX buffers: every refusal waits, so TX stops once CTRL_BACKLOG of them do.
    let mut sent = flood_until_stalled(&mut g, &mut m, 0, TOTAL);
    assert_eq!(m.pending_ctrl(), CTRL_BACKLOG);
    assert_eq!(usize::from(g.tx_used()), CTRL_BACKLOG, "TX consumed up to the backlog only");
    assert_eq!(g.txr.in_flight(), QSIZE, "the rest is left in the avail ring");
    assert!(m.tx_stalled && !m.tx_resumable());
    for _ in 0..10 {
        g.pump(&mut m);
    }
    assert_eq!((usize::from(g.tx_used()), m.pending_ctrl()), (CTRL_BACKLOG, CTRL_BACKLOG));

    // RX buffers drain the backlog and TX resumes, with no new TX notification: the worker
    // goes round again while tx_resumable(). Every refused packet gets its RST, none is lost.
    let mut rsts = HashSet::new();
    for round in 0.. {
        assert!(round < 1000, "no progress");
        g.give_rx_buffers(QSIZE);
        g.pump(&mut m);
        while m.tx_resumable() {
            g.pump(&mut m);
        }
        for (h, _) in g.received() {
            assert_eq!({ h.op }, OP_RST);
            assert!(rsts.insert(h.dst_port), "one RST per packet");
        }
        assert!(m.pending_ctrl() <= CTRL_BACKLOG);
        if rsts.len() == TOTAL as usize {
            break;
        }
        while sent < TOTAL && g.post_tx(refused(sent)) {
            sent += 1;
        }
    }
    assert_eq!(g.tx_used(), TOTAL as u16);
    assert_eq!((m.pending_ctrl(), m.connection_count()), (0, 0));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn replies_for_one_key_take_one_slot() {
    let dir = sock_dir("dedupe");
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_7", path.display())).unwrap();
    let mut m = Muxer::new(CID, &path).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    g.give_rx_buffers(1);
    assert!(g.post_tx(Guest::hdr(OP_REQUEST, 100, 7)));
    g.pump(&mut m);
    assert_eq!({ g.received()[0].0.op }, OP_RESPONSE);
    let (_host, _) = listener.accept().unwrap();
    // No RX buffers, and 10,000 packets that each ask for a reply to one of two keys: a
    // credit request on the live connection, data for a connection that does not exist.
    for i in 0..10_000 {
        let h = if i % 2 == 0 { Guest::hdr(OP_CREDIT_REQUEST, 100, 7) } else { Guest::hdr(OP_RW, 555, 7) };
        while !g.post_tx(h) {
            g.pump(&mut m);
        }
    }
    g.pump(&mut m);
    assert_eq!(g.tx_used(), 10_001, "TX never stalled");
    assert_eq!(m.pending_ctrl(), 2);
    g.give_rx_buffers(8);
    g.pump(&mut m);
    let got: Vec<_> = g.received().iter().map(|(h, _)| (h.op, h.dst_port)).collect();
    assert_eq!(got, [(OP_CREDIT_UPDATE, 100), (OP_RST, 555)]);
    assert_eq!(m.connection_count(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn host_connects_are_refused_while_the_guest_takes_no_packets() {
    let dir = sock_dir("backlog-host");
    let path = dir.join("v.sock");
    let mut m = Muxer::new(CID, &path).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    flood_until_stalled(&mut g, &mut m, 0, CTRL_BACKLOG as u32);
    assert_eq!(m.pending_ctrl(), CTRL_BACKLOG);
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.pump(&mut m);
    let reply = read_to_end(&mut client);
    assert!(reply.starts_with("ERR "), "{reply:?}");
    assert_eq!((m.connection_count(), m.pending_ctrl()), (0, CTRL_BACKLOG));
    // Once the guest drains the backlog, host connects go through again.
    g.give_rx_buffers(QSIZE);
    g.pump(&mut m);
    assert_eq!(g.received().len(), CTRL_BACKLOG);
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.give_rx_buffers(1);
    g.pump(&mut m);
    assert_eq!(g.received().iter().map(|(h, _)| (h.op, h.dst_port)).collect::<Vec<_>>(), [(OP_REQUEST, 52)]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn connections_short_of_established_are_reset_at_their_deadline() {
    let dir = sock_dir("deadline");
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_7", path.display())).unwrap();
    let mut m = Muxer::new(CID, &path).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    // One for the RESPONSE below and one for the REQUEST after it; then none.
    g.give_rx_buffers(2);
    // Established in time: no deadline left.
    assert!(g.post_tx(Guest::hdr(OP_REQUEST, 100, 7)));
    g.pump(&mut m);
    assert_eq!({ g.received()[0].0.op }, OP_RESPONSE);
    let (_ok_host, _) = listener.accept().unwrap();
    // Host-initiated, and the guest never answers the REQUEST.
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.pump(&mut m);
    let req = g.received()[0].0;
    assert_eq!(({ req.op }, { req.dst_port }), (OP_REQUEST, 52));
    // Guest-initiated, and the guest posts no RX buffer for the RESPONSE.
    assert!(g.post_tx(Guest::hdr(OP_REQUEST, 101, 7)));
    g.pump(&mut m);
    let (mut stuck_host, _) = listener.accept().unwrap();
    // A host client that never sends its line.
    let mut silent = UnixStream::connect(&path).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.pump(&mut m);
    assert_eq!((m.connection_count(), m.handshakes.len()), (3, 1));

    // The clock is injected: nothing expires a second early, everything stuck on time.
    let later = Instant::now();
    m.expire(later + CONNECT_TIMEOUT.min(HANDSHAKE_TIMEOUT) - Duration::from_secs(1));
    assert_eq!((m.connection_count(), m.handshakes.len()), (3, 1));
    m.expire(later + CONNECT_TIMEOUT.max(HANDSHAKE_TIMEOUT));
    assert_eq!((m.connection_count(), m.handshakes.len()), (1, 0));
    let reply = read_to_end(&mut client);
    assert!(reply.starts_with("ERR ") && reply.contains("did not answer"), "{reply:?}");
    let reply = read_to_end(&mut silent);
    assert!(reply.starts_with("ERR ") && reply.contains("handshake"), "{reply:?}");
    assert_eq!(read_to_end(&mut stuck_host), "", "the host service sees the stream closed");
    // The guest hears RST for both; the RESPONSE it never had room for is gone.
    g.give_rx_buffers(8);
    g.pump(&mut m);
    let mut got: Vec<_> = g.received().iter().map(|(h, _)| (h.op, h.dst_port)).collect();
    got.sort();
    assert_eq!(got, [(OP_RST, 52), (OP_RST, 101)]);
    // The established connection still carries data.
    assert!(g.post_tx(Guest::hdr(OP_CREDIT_REQUEST, 100, 7)));
    g.pump(&mut m);
    assert_eq!({ g.received()[0].0.op }, OP_CREDIT_UPDATE);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn deadlines_fire_on_the_muxer_timer() {
    let dir = sock_dir("timer");
    let path = dir.join("v.sock");
    let mut m = Muxer::new(CID, &path).unwrap();
    m.connect_timeout = Duration::from_millis(100);
    m.handshake_timeout = Duration::from_millis(100);
    let mem = mem();
    let mut g = Guest::new(&mem);
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let mut silent = UnixStream::connect(&path).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.pump(&mut m);
    assert_eq!((m.connection_count(), m.handshakes.len()), (1, 1));
    // Nothing but the muxer's own timer (in its epoll) can end them.
    wait_for("the deadlines", || {
        g.pump(&mut m);
        (m.connection_count(), m.handshakes.len()) == (0, 0)
    });
    assert!(read_to_end(&mut client).starts_with("ERR "));
    assert!(read_to_end(&mut silent).starts_with("ERR "));
    assert_eq!(m.epoll().wait(0, &mut [EpollEvent::default(); 1]).unwrap(), 0, "timer disarmed");
    // The REQUEST the guest never took became an RST.
    assert_eq!(m.pending_ctrl(), 1);
    g.give_rx_buffers(1);
    g.pump(&mut m);
    assert_eq!({ g.received()[0].0.op }, OP_RST);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn connection_count_is_capped() {
    let dir = sock_dir("cap");
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_7", path.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut m = Muxer::new(CID, &path).unwrap();
    let mem = mem();
    let mut g = Guest::new(&mem);
    let mut hosts = Vec::new();
    let accept = |hosts: &mut Vec<UnixStream>| {
        while let Ok((s, _)) = listener.accept() {
            hosts.push(s);
        }
    };
    let mut responses = 0;
    for i in 0..MAX_CONNECTIONS as u32 + 10 {
        while !g.post_tx(Guest::hdr(OP_REQUEST, 20_000 + i, 7)) {
            g.give_rx_buffers(QSIZE);
            g.pump(&mut m);
            accept(&mut hosts);
        }
        g.give_rx_buffers(QSIZE);
        g.pump(&mut m);
        accept(&mut hosts);
        for (h, _) in g.received() {
            match h.op {
                OP_RESPONSE => responses += 1,
                op => assert!(op == OP_RST && h.dst_port >= 20_000 + MAX_CONNECTIONS as u32, "{h:?}"),
            }
        }
    }
    assert_eq!(
        (responses, m.connection_count(), hosts.len()),
        (MAX_CONNECTIONS, MAX_CONNECTIONS, MAX_CONNECTIONS)
    );
    // Host clients are refused too.
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.pump(&mut m);
    assert!(read_to_end(&mut client).starts_with("ERR "));
    // One closes; one more fits.
    assert!(g.post_tx(Guest::hdr(OP_RST, 20_000, 7)));
    assert!(g.post_tx(Guest::hdr(OP_REQUEST, 30_000, 7)));
    g.pump(&mut m);
    assert_eq!({ g.received()[0].0.op }, OP_RESPONSE);
    assert_eq!(m.connection_count(), MAX_CONNECTIONS);
    std::fs::remove_dir_all(dir).unwrap();
}

/// The device worker, not just the muxer: TX stalled behind the control backlog starts moving
/// again when the guest posts RX buffers and notifies the RX queue only.
#[test]
fn worker_resumes_tx_when_rx_buffers_arrive() {
    let dir = sock_dir("worker");
    let mem = mem();
    let mut g = Guest::new(&mem);
    // The worker gets its own view of the same rings.
    let (_, rxq) = DriverRing::new(&mem, RX_RING);
    let (_, txq) = DriverRing::new(&mem, TX_RING);
    let (_, evq) = DriverRing::new(&mem, EV_RING);
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let evts: Vec<EventFd> = (0..3).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
    let kicks: Vec<EventFd> = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues: vec![rxq, txq, evq],
        queue_evts: evts,
        interrupt: Arc::new(VirtioInterrupt::new(irqfd)),
        acked_features: VIRTIO_F_VERSION_1,
    };
    let mut dev = Vsock::new(CID, dir.join("v.sock"));
    dev.activate(ctx).unwrap();
    let (rx_kick, tx_kick) = (&kicks[0], &kicks[1]);

    let mut sent = 0;
    while g.post_tx(refused(sent)) {
        sent += 1;
    }
    tx_kick.write(1).unwrap();
    wait_for("TX up to the backlog", || usize::from(g.tx_used()) == CTRL_BACKLOG);
    while g.post_tx(refused(sent)) {
        sent += 1;
    }
    tx_kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(usize::from(g.tx_used()), CTRL_BACKLOG, "stalled");

    g.give_rx_buffers(QSIZE);
    rx_kick.write(1).unwrap();
    wait_for("TX to resume", || u32::from(g.tx_used()) == sent);
    wait_for("the RSTs", || g.rxr.in_flight() == 0);
    assert!(g.received().iter().all(|(h, _)| h.op == OP_RST));
    dev.reset();
    std::fs::remove_dir_all(dir).unwrap();
}
