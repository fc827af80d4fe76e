//! virtio-vsock from a hostile guest: the input is a script of guest TX packets (well-formed
//! headers with fuzzed fields, or raw descriptor chains), RX buffers, writes anywhere in guest
//! RAM (rings included), device passes, and the host ends of the Unix sockets the muxer bridges
//! to (data, close, shutdown, host-initiated `CONNECT` lines).
//!
//! Every iteration gets fresh guest memory and a fresh `Muxer`, so a crash replays from its
//! input alone; the host listeners the guest connects to live for the whole process and their
//! backlogs are drained after every device pass, so no fd outlives its iteration.

#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use husk_vmm::devices::virtio::vsock::muxer::{Muxer, MAX_CONNECTIONS, MAX_PENDING_CTRL};
use husk_vmm::devices::virtio::vsock::packet::{PacketHeader, HDR_LEN, HOST_CID, TYPE_STREAM};
use husk_vmm_fuzz::*;
use libfuzzer_sys::fuzz_target;
use virtio_queue::Queue;
use vm_memory::{ByteValued, Bytes, GuestAddress};

const CID: u64 = 3;
const QUEUE_SIZE: u16 = 256;
const TX_RING: u64 = 0x1_0000;
const RX_RING: u64 = 0x2_0000;
/// Host ports with a listener (`<socket>_PORT`); 999 has none.
const LISTEN_PORTS: [u32; 2] = [1234, 7];
/// The muxer numbers host-initiated connections from here (muxer.rs `FIRST_LOCAL_PORT`).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const MAX_COMMANDS: usize = 96;
const MAX_HOST_STREAMS: usize = 2048;

struct Host {
    _dir: PathBuf,
    uds: PathBuf,
    listeners: Vec<UnixListener>,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        raise_nofile_limit();
        let dir = std::env::temp_dir().join(format!("husk-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        at_exit_remove(dir.clone());
        let uds = dir.join("v.sock");
        let listeners = LISTEN_PORTS
            .iter()
            .map(|p| {
                let l = UnixListener::bind(format!("{}_{p}", uds.display())).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        Host { _dir: dir, uds, listeners }
    })
}

struct Run<'a> {
    mem: &'a Mem,
    muxer: Muxer,
    tx: Ring,
    txq: Queue,
    rx: Ring,
    rxq: Queue,
    alloc: Alloc,
    /// Host ends: connections the muxer made to our listeners, and our own clients.
    streams: Vec<UnixStream>,
}

impl Run<'_> {
    fn accept(&mut self) {
        for l in &host().listeners {
            while let Ok((s, _)) = l.accept() {
                if self.streams.len() < MAX_HOST_STREAMS && s.set_nonblocking(true).is_ok() {
                    self.streams.push(s);
                }
            }
        }
    }

    fn process_tx(&mut self) {
        self.muxer.process_tx(&mut self.txq, self.mem);
        // Guest connects land in our listeners' backlogs; keep them short so a later connect
        // (a blocking call in the muxer) never waits on us.
        self.accept();
    }

    fn pump(&mut self) {
        self.process_tx();
        self.muxer.handle_events();
        self.muxer.process_rx(&mut self.rxq, self.mem);
        // As the worker does: TX left in its ring for want of RX buffers goes on once RX
        // delivery made room (each round consumes TX chains, which the ring bounds).
        for _ in 0..4 {
            if !self.muxer.tx_resumable() {
                break;
            }
            self.process_tx();
            self.muxer.process_rx(&mut self.rxq, self.mem);
        }
        assert!(self.muxer.connection_count() <= MAX_CONNECTIONS);
        assert!(self.muxer.pending_ctrl() <= MAX_PENDING_CTRL);
    }

    fn stream(&mut self, inp: &mut Input<'_>) -> Option<usize> {
        let j = inp.u8() as usize;
        (!self.streams.is_empty()).then(|| j % self.streams.len())
    }

    fn port(inp: &mut Input<'_>) -> u32 {
        match inp.u8() {
            0 => LISTEN_PORTS[0],
            1 => LISTEN_PORTS[1],
            2 => 999,
            3..=7 => 5000 + u32::from(inp.u8() % 4),
            8..=11 => FIRST_LOCAL_PORT + u32::from(inp.u8() % 4),
            _ => inp.u32(),
        }
    }

    /// A TX packet with a real header (fields mostly valid, each replaceable by raw values),
    /// spread over descriptors as the script says.
    fn tx_packet(&mut self, inp: &mut Input<'_>) {
        let src_cid = match inp.u8() {
            0..=0xef => CID,
            0xf0..=0xf7 => HOST_CID,
            _ => inp.u64(),
        };
        let dst_cid = match inp.u8() {
            0..=0xef => HOST_CID,
            0xf0..=0xf7 => CID,
            _ => inp.u64(),
        };
        let src_port = Self::port(inp);
        let dst_port = Self::port(inp);
        let type_ = match inp.u8() {
            0..=0xef => TYPE_STREAM,
            _ => inp.u16(),
        };
        let op = u16::from(inp.u8() % 9);
        let flags = u32::from(inp.u8());
        let buf_alloc = match inp.u8() {
            0..=0x7f => 1 << 20,
            0x80..=0xbf => u32::from(inp.u16()),
            _ => inp.u32(),
        };
        let fwd_cnt = if inp.u8() & 1 == 0 { 0 } else { inp.u32() };
        let payload = inp.payload();
        let len = if inp.u8() & 1 == 0 { payload.len() as u32 } else { inp.u32() };
        let hdr =
            PacketHeader { src_cid, dst_cid, src_port, dst_port, len, type_, op, flags, buf_alloc, fwd_cnt };
        // Layout: header split at some byte or whole; header and payload contiguous or not;
        // payload over 1-4 descriptors; optionally some descriptors marked device-writable.
        let layout = inp.u8();
        let hsplit = inp.u8() as usize % HDR_LEN;
        let wmask = if layout & 0x80 != 0 { inp.u8() } else { 0 };
        let mut bytes = hdr.as_slice().to_vec();
        bytes.extend_from_slice(&payload);
        let addr = self.alloc.alloc(bytes.len());
        let _ = self.mem.write_slice(&bytes, GuestAddress(addr));
        let mut descs = Vec::new();
        let hdr_end = if layout & 0x40 != 0 { bytes.len() } else { HDR_LEN };
        if hsplit > 0 {
            descs.push((addr, hsplit as u32, 0));
            descs.push((addr + hsplit as u64, (hdr_end - hsplit) as u32, 0));
        } else {
            descs.push((addr, hdr_end as u32, 0));
        }
        if hdr_end < bytes.len() {
            let parts = 1 + (layout as usize & 3);
            descs.extend(split(addr + hdr_end as u64, bytes.len() - hdr_end, parts, 0));
        }
        for (i, d) in descs.iter_mut().enumerate() {
            if wmask & (1 << (i % 8)) != 0 {
                d.2 |= F_WRITE;
            }
        }
        let head = self.tx.write_chain(self.mem, &descs);
        self.tx.push_avail(self.mem, head);
    }

    fn rx_buffers(&mut self, inp: &mut Input<'_>) {
        let n = 1 + inp.u8() % 32;
        let len = match inp.u8() {
            0..=0x7f => 4096,
            0x80..=0x9f => HDR_LEN,
            0xa0..=0xaf => HDR_LEN - 1,
            0xb0..=0xbf => HDR_LEN + 64 * 1024,
            _ => inp.u16() as usize,
        };
        let shape = inp.u8();
        let parts = 1 + (shape as usize & 3);
        let flags = if shape & 0x80 != 0 { 0 } else { F_WRITE };
        for _ in 0..n {
            let addr = self.alloc.alloc(len);
            let head = self.rx.write_chain(self.mem, &split(addr, len, parts, flags));
            self.rx.push_avail(self.mem, head);
        }
    }

    fn command(&mut self, inp: &mut Input<'_>) {
        match inp.u8() % 16 {
            0..=3 => self.tx_packet(inp),
            4 => self.tx.raw_chain(self.mem, inp),
            5 | 6 => self.rx_buffers(inp),
            7 => self.rx.raw_chain(self.mem, inp),
            8 => mem_write(self.mem, inp),
            9 => {
                let idx = inp.u16();
                let ring = if idx & 1 == 0 { &mut self.tx } else { &mut self.rx };
                ring.set_avail_idx(self.mem, inp.u16());
            }
            10 => match inp.u8() % 4 {
                0 => self.process_tx(),
                1 => self.muxer.handle_events(),
                2 => {
                    self.muxer.process_rx(&mut self.rxq, self.mem);
                }
                _ => self.pump(),
            },
            11 => {
                // Host writes to one of its ends.
                let data = inp.payload();
                if let Some(j) = self.stream(inp) {
                    let _ = self.streams[j].write(&data);
                }
            }
            12 => {
                // Host reads what the guest sent (frees socket buffer space).
                if let Some(j) = self.stream(inp) {
                    let mut buf = vec![0u8; 256 * 1024];
                    let _ = self.streams[j].read(&mut buf);
                }
            }
            13 => {
                let how = inp.u8();
                if let Some(j) = self.stream(inp) {
                    let _ = match how % 4 {
                        0 => {
                            self.streams.swap_remove(j);
                            Ok(())
                        }
                        1 => self.streams[j].shutdown(Shutdown::Write),
                        2 => self.streams[j].shutdown(Shutdown::Read),
                        _ => self.streams[j].shutdown(Shutdown::Both),
                    };
                }
            }
            14 => {
                // A host client connects to the VM's socket (the handshake is host input, but
                // the guest's answers to the REQUEST it causes are what we are after).
                let line = if inp.u8() & 1 == 0 {
                    format!("CONNECT {}\n", Self::port(inp)).into_bytes()
                } else {
                    let n = inp.u8() as usize;
                    inp.bytes(n).to_vec()
                };
                if self.streams.len() < MAX_HOST_STREAMS {
                    if let Ok(mut s) = UnixStream::connect(&host().uds) {
                        let _ = s.set_nonblocking(true);
                        let _ = s.write(&line);
                        self.streams.push(s);
                    }
                }
            }
            _ => self.pump(),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let host = host();
    let mem = guest_memory();
    let muxer = Muxer::new(CID, &host.uds).expect("muxer");
    let (tx, txq) = Ring::new(&mem, TX_RING, QUEUE_SIZE);
    let (rx, rxq) = Ring::new(&mem, RX_RING, QUEUE_SIZE);
    let mut run = Run { mem: &mem, muxer, tx, txq, rx, rxq, alloc: Alloc::default(), streams: Vec::new() };
    let mut inp = Input::new(data);
    for _ in 0..MAX_COMMANDS {
        if inp.is_empty() {
            break;
        }
        run.command(&mut inp);
    }
    // Let everything that was queued settle.
    for _ in 0..3 {
        run.pump();
    }
    let Run { muxer, streams, .. } = run;
    drop(muxer);
    drop(streams);
    // Connections the muxer made after the last drain.
    for l in &host.listeners {
        while l.accept().is_ok() {}
    }
});
