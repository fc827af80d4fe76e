//! The hybrid-vsock handshake, host side: whatever a host client writes to the VMM's Unix
//! socket before (and right after) its `CONNECT <port>\n` line.
//!
//! Every input runs twice:
//!
//! 1. Through the std-only codec (`husk_proto::handshake`) alone: the bytes go through a
//!    `LineReader`, every line is parsed as a request and as a reply, and what parses must
//!    re-encode to exactly that line (one spelling of everything); every error, sent back as
//!    `ERR <reason>`, must encode to one line that parses; arbitrary reasons and stdio names
//!    must encode to lines a peer reads as the encoder promises.
//! 2. Through the muxer (`Muxer::handle_events`, `read_handshake`), unless the preamble says
//!    codec only: a fresh `Muxer` per iteration, a host client that writes the bytes in pieces
//!    of a chosen size (with muxer event passes between them) and optionally ends its side.
//!    The outcome is predicted from the codec: a valid `CONNECT <port>` line gives a connection
//!    in `Connecting` and one REQUEST to guest `<port>` (delivered into guest RX buffers and
//!    checked); anything else gives one `ERR` line and a closed stream, and the guest hears
//!    nothing; a partial line gives nothing yet. The guest then answers RESPONSE (the client
//!    must read `OK <local port>\n`, and exactly the bytes it sent after its newline must reach
//!    the guest as stream data) or RST (the client sees the stream end without an OK line).

#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;

use husk_proto::handshake::{
    is_valid_stdio_name, HandshakeError, LineReader, Reply, Request, MAX_LINE, MAX_REASON,
};
use husk_vmm::devices::virtio::vsock::muxer::Muxer;
use husk_vmm::devices::virtio::vsock::packet::{
    PacketHeader, HDR_LEN, HOST_CID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM,
};
use husk_vmm_fuzz::*;
use libfuzzer_sys::fuzz_target;
use virtio_queue::Queue;
use vm_memory::{ByteValued, Bytes, GuestAddress};

const CID: u64 = 3;
const QUEUE_SIZE: u16 = 64;
const TX_RING: u64 = 0x1_0000;
const RX_RING: u64 = 0x2_0000;
const RX_BUF: usize = 4096;
/// The muxer numbers host-initiated connections from here (muxer.rs `FIRST_LOCAL_PORT`).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most bytes the client sends (well under a Unix socket's buffer, so writes never block).
const MAX_STREAM: usize = 8192;

fn sock_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        // As in the VMM (a Rust main ignores it): a write to a closed stream is EPIPE, not death.
        // SAFETY: installs the ignore disposition; no handler code runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = std::env::temp_dir().join(format!("husk-fuzz-handshake-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        at_exit_remove(dir.clone());
        dir.join("v.sock")
    })
}

/// The body of an encoded line: exactly one `\n`, at the end.
fn body(encoded: &[u8]) -> &[u8] {
    let (last, body) = encoded.split_last().expect("an encoded line is not empty");
    assert_eq!(*last, b'\n', "{encoded:?}");
    assert!(!body.contains(&b'\n'), "newline inside {encoded:?}");
    assert!(body.len() <= MAX_LINE, "encoded line of {} bytes", body.len());
    body
}

/// What a peer reading byte by byte makes of `bytes`: the first line, or the reader's error, or
/// nothing (no newline yet).
fn first_line(bytes: &[u8]) -> (Option<Result<Vec<u8>, HandshakeError>>, usize) {
    let mut r = LineReader::new();
    for (i, &b) in bytes.iter().enumerate() {
        match r.push_byte(b) {
            Ok(None) => {}
            Ok(Some(line)) => return (Some(Ok(line)), i + 1),
            Err(e) => return (Some(Err(e)), i + 1),
        }
    }
    (None, bytes.len())
}

fn check_error_reply(e: &HandshakeError) {
    let line = Reply::Err(e.to_string()).encode();
    assert!(matches!(Reply::parse_line(body(&line)), Ok(Reply::Err(_))), "{line:?}");
}

/// Part 1: the codec on its own.
fn codec(bytes: &[u8]) {
    // Every line of the stream, as the VMM, the agent and the runtime read them.
    let mut rest = bytes;
    while !rest.is_empty() {
        let (line, used) = first_line(rest);
        rest = &rest[used..];
        let Some(line) = line else { break };
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                assert_eq!(e, HandshakeError::TooLong);
                check_error_reply(&e);
                continue; // as a fresh connection would
            }
        };
        assert!(line.len() <= MAX_LINE && !line.contains(&b'\n'));
        match Request::parse_line(&line) {
            Ok(r) => {
                assert_eq!(body(&r.encode()), &line[..], "{r:?} has two spellings");
                if let Request::Stdio(name) = &r {
                    assert!(is_valid_stdio_name(name));
                }
                if let Request::Forward(p) = r {
                    assert_ne!(p, 0);
                }
            }
            Err(e) => check_error_reply(&e),
        }
        match Reply::parse_line(&line) {
            Ok(r) => assert_eq!(body(&r.encode()), &line[..], "{r:?} has two spellings"),
            Err(e) => check_error_reply(&e),
        }
    }

    // Any reason is sent as one line that parses back to what was sent (sanitized).
    let reason = String::from_utf8_lossy(bytes).into_owned();
    let line = Reply::Err(reason.clone()).encode();
    match Reply::parse_line(body(&line)) {
        Ok(Reply::Err(got)) => {
            assert!(got.len() <= MAX_REASON && !got.chars().any(char::is_control));
            assert_eq!(Reply::Err(got).encode(), line);
        }
        other => panic!("ERR line {line:?} read back as {other:?}"),
    }

    // A stdio name: valid ones round-trip; a peer reading the line of an invalid one refuses it.
    let name = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
    let line = Request::Stdio(name.clone()).encode();
    let (first, _) = first_line(&line);
    let parsed = first.map(|l| l.and_then(|l| Request::parse_line(&l)));
    if is_valid_stdio_name(&name) {
        assert_eq!(parsed, Some(Ok(Request::Stdio(name))));
    } else {
        assert!(matches!(parsed, Some(Err(_))), "invalid stdio name {name:?} read as {parsed:?}");
    }
}

/// The guest side of the vsock device: TX and RX rings on fresh guest memory.
struct Guest {
    mem: Mem,
    tx: Ring,
    txq: Queue,
    rx: Ring,
    rxq: Queue,
    alloc: Alloc,
    /// Buffer address of every RX head we posted.
    rx_bufs: Vec<u64>,
    used_seen: u16,
}

impl Guest {
    fn new() -> Self {
        let mem = guest_memory();
        let (tx, txq) = Ring::new(&mem, TX_RING, QUEUE_SIZE);
        let (rx, rxq) = Ring::new(&mem, RX_RING, QUEUE_SIZE);
        let mut g = Guest {
            mem,
            tx,
            txq,
            rx,
            rxq,
            alloc: Alloc::default(),
            rx_bufs: vec![0; QUEUE_SIZE as usize],
            used_seen: 0,
        };
        for _ in 0..QUEUE_SIZE / 2 {
            let addr = g.alloc.alloc(RX_BUF);
            let head = g.rx.write_chain(&g.mem, &[(addr, RX_BUF as u32, F_WRITE)]);
            g.rx_bufs[head as usize] = addr;
            g.rx.push_avail(&g.mem, head);
        }
        g
    }

    /// Runs RX delivery and returns the packets the guest got.
    fn receive(&mut self, m: &mut Muxer) -> Vec<(PacketHeader, Vec<u8>)> {
        m.process_rx(&mut self.rxq, &self.mem);
        let mut out = Vec::new();
        while self.used_seen != self.rx.used_idx(&self.mem) {
            let (id, len) = self.rx.used_elem(&self.mem, self.used_seen);
            self.used_seen = self.used_seen.wrapping_add(1);
            let addr = self.rx_bufs[id as usize];
            assert!(len as usize >= HDR_LEN && len as usize <= RX_BUF, "RX used length {len}");
            let h: PacketHeader = self.mem.read_obj(GuestAddress(addr)).expect("header");
            let mut payload = vec![0u8; len as usize - HDR_LEN];
            self.mem.read_slice(&mut payload, GuestAddress(addr + HDR_LEN as u64)).expect("payload");
            assert_eq!({ h.len } as usize, payload.len());
            assert_eq!(({ h.src_cid }, { h.dst_cid }, { h.type_ }), (HOST_CID, CID, TYPE_STREAM));
            // Give the buffer back.
            self.rx.push_avail(&self.mem, id as u16);
            out.push((h, payload));
        }
        out
    }

    fn send(&mut self, m: &mut Muxer, op: u16, src_port: u32, dst_port: u32) {
        let h = PacketHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        };
        let addr = self.alloc.alloc(HDR_LEN);
        self.mem.write_slice(h.as_slice(), GuestAddress(addr)).expect("tx header");
        let head = self.tx.write_chain(&self.mem, &[(addr, HDR_LEN as u32, 0)]);
        self.tx.push_avail(&self.mem, head);
        m.process_tx(&mut self.txq, &self.mem);
    }
}

/// Everything the client can read now: (bytes, how the stream stands).
#[derive(Debug, PartialEq)]
enum End {
    Open,
    Closed,
}

fn drain(s: &mut UnixStream) -> (Vec<u8>, End) {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, End::Closed),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return (out, End::Open),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // The muxer closed with bytes of ours unread: a Unix socket reports a reset then.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (out, End::Closed),
            Err(e) => panic!("client read: {e}"),
        }
    }
}

/// Part 2: the same bytes from a host client into the muxer.
fn muxer(inp: &mut Input<'_>, stream: &[u8]) {
    let piece = match inp.u8() {
        0 => usize::MAX,
        n => usize::from(n),
    };
    let flags = inp.u8();
    let eof = flags & 1 != 0;
    let answer = (flags >> 1) % 3; // 0: RESPONSE, 1: RST, 2: none

    let mut m = Muxer::new(CID, sock_path()).expect("muxer");
    let mut g = Guest::new();
    let mut client = UnixStream::connect(sock_path()).expect("connect");
    client.set_nonblocking(true).expect("nonblocking");
    m.handle_events(); // accepts
    for chunk in stream.chunks(piece.min(stream.len()).max(1)) {
        // Refused streams are closed by the muxer: later writes may fail, which is fine.
        if client.write_all(chunk).is_err() {
            break;
        }
        m.handle_events();
    }
    if eof {
        let _ = client.shutdown(Shutdown::Write);
    }
    m.handle_events();

    let (line, used) = first_line(stream);
    let request = match &line {
        Some(Ok(l)) => Some(Request::parse_line(l)),
        Some(Err(e)) => Some(Err(e.clone())),
        None if eof => Some(Err(HandshakeError::Unterminated)),
        None => None,
    };
    let (reply, end) = drain(&mut client);
    let packets = g.receive(&mut m);
    match request {
        None => {
            // Still waiting for the rest of the line.
            assert!(reply.is_empty() && end == End::Open, "{reply:?} {end:?}");
            assert!(packets.is_empty() && m.connection_count() == 0 && m.pending_ctrl() == 0);
        }
        Some(Ok(Request::Connect(port))) => {
            assert!(reply.is_empty() && end == End::Open, "answered {reply:?} {end:?} before the guest");
            assert_eq!(m.connection_count(), 1);
            assert_eq!(packets.len(), 1, "{packets:?}");
            let h = packets[0].0;
            assert_eq!(({ h.op }, { h.dst_port }), (OP_REQUEST, port), "{h:?}");
            let local = h.src_port;
            assert!(local >= FIRST_LOCAL_PORT);
            let after = &stream[used..];
            match answer {
                0 => {
                    g.send(&mut m, OP_RESPONSE, port, local);
                    m.handle_events();
                    let mut data = Vec::new();
                    let mut shut = false;
                    for _ in 0..(after.len() / RX_BUF + 4) {
                        for (h, p) in g.receive(&mut m) {
                            assert_eq!(({ h.src_port }, { h.dst_port }), (local, port));
                            match h.op {
                                OP_RW => {
                                    assert!(!shut, "data after SHUTDOWN");
                                    data.extend_from_slice(&p)
                                }
                                OP_SHUTDOWN => shut = true,
                                op => panic!("unexpected op {op} on an established stream"),
                            }
                        }
                        m.handle_events();
                    }
                    assert_eq!(data, after, "the bytes after the handshake line");
                    assert_eq!(shut, eof, "the client's end of stream reaches the guest as SHUTDOWN");
                    let (reply, end) = drain(&mut client);
                    assert_eq!(
                        reply,
                        Reply::Ok(Some(local)).encode(),
                        "{:?}",
                        String::from_utf8_lossy(&reply)
                    );
                    assert_eq!(end, End::Open);
                }
                1 => {
                    g.send(&mut m, OP_RST, port, local);
                    m.handle_events();
                    let (reply, end) = drain(&mut client);
                    assert!(reply.is_empty(), "{reply:?} after RST");
                    assert_eq!(end, End::Closed);
                    assert_eq!(m.connection_count(), 0);
                }
                _ => {}
            }
        }
        Some(_) => {
            // One ERR line, then the end of the stream; the guest hears nothing.
            let text = String::from_utf8_lossy(&reply);
            let Some(l) = reply.strip_suffix(b"\n") else { panic!("unterminated reply {text:?}") };
            assert!(matches!(Reply::parse_line(l), Ok(Reply::Err(_))), "{text:?}");
            assert_eq!(end, End::Closed, "{text:?}");
            assert!(packets.is_empty(), "{packets:?}");
            assert_eq!((m.connection_count(), m.pending_ctrl()), (0, 0));
        }
    }
    drop(client);
    m.handle_events();
    drop(m);
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let preamble = inp.bytes(2).to_vec();
    let stream = inp.bytes(MAX_STREAM);
    codec(stream);
    if mode & 1 == 0 {
        muxer(&mut Input::new(&preamble), stream);
    }
});
