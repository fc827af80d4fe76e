//! The host side of hybrid vsock: guest streams mapped onto Unix sockets.
//!
//! - Host → guest: a client connects to the VM's socket and writes `CONNECT <port>\n`; we pick a
//!   local (host) port, send the guest a REQUEST, and on its RESPONSE answer `OK <local port>\n`
//!   (a bad line gets `ERR <reason>\n`; the lines are [`husk_proto::handshake`]'s).
//! - Guest → host: a guest connect to port P is a Unix connect to `<socket path>_P`.
//!
//! Flow control is the spec's credit scheme both ways: we never read more from a host socket
//! than the guest has room for, and the guest never sends more than our per-connection buffer
//! (`BUF_ALLOC`) holds, so memory per connection is bounded however slow either end is. Host
//! sockets are edge-triggered in epoll: a connection that cannot move data now waits in a
//! pending set instead of spinning.
//!
//! Everything else the guest can make us hold is bounded too:
//! - connections and host handshakes together by [`MAX_CONNECTIONS`];
//! - connections short of established, and host handshakes, by a deadline
//!   ([`CONNECT_TIMEOUT`], [`HANDSHAKE_TIMEOUT`]) on the muxer's timer ([`deadline`]);
//! - control packets waiting for RX buffers ([`ctrl`]) by one per connection key and
//!   [`MAX_PENDING_CTRL`] in all. Once [`CTRL_BACKLOG`] wait, TX is left in the avail ring (and
//!   host connects are refused) until the guest posts RX buffers: back-pressure, not drops.
//!
//! [`deadline`]: super::deadline
//! [`ctrl`]: super::ctrl

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use husk_proto::handshake::{HandshakeError, LineReader, Reply, Request};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::ctrl::CtrlQueue;
use super::deadline::DeadlineTimer;
use super::packet::*;
use crate::devices::virtio::log_limit::LogLimit;
use crate::memory::GuestMem;

#[cfg(test)]
mod tests;

/// Bytes of guest→host data we buffer per connection (advertised to the guest as buf_alloc).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Host ports we hand out for host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most host streams at once: connections in any state plus host handshakes not yet read.
/// More are refused (the guest gets RST, a host client `ERR`).
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets waiting for guest RX buffers at which TX stops being consumed (and host
/// connects are refused) until the guest posts RX buffers. A guest packet causes at most one
/// control packet, so sending cannot push the queue past this.
pub const CTRL_BACKLOG: usize = 256;
/// Hard cap on control packets waiting for guest RX buffers. Past [`CTRL_BACKLOG`] nothing
/// makes a new connection, and each live one (at most [`MAX_CONNECTIONS`]) holds one packet at
/// most, however often host events or deadlines touch it; so this is never reached, and a
/// packet that would go past it is dropped rather than grow the queue.
pub const MAX_PENDING_CTRL: usize = CTRL_BACKLOG + MAX_CONNECTIONS;
/// How long a host client has, once connected, to send its handshake line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may stay short of established: a host-initiated one waiting for the
/// guest's RESPONSE (the client waits for `OK`), a guest-initiated one whose RESPONSE waits for
/// a guest RX buffer (the host service holds a connected socket). Then it is reset.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A drained per-connection buffer that grew past this gives its memory back.
const TX_BUF_KEEP: usize = MAX_PAYLOAD as usize;

/// epoll tokens below this belong to the device worker (queues, kill).
pub const FIRST_MUXER_TOKEN: u64 = 8;
const TOKEN_LISTENER: u64 = FIRST_MUXER_TOKEN;
const TOKEN_TIMER: u64 = FIRST_MUXER_TOKEN + 1;
const FIRST_STREAM_TOKEN: u64 = FIRST_MUXER_TOKEN + 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated; REQUEST queued or sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Guest-initiated; the host socket is connected and our RESPONSE waits for an RX buffer.
    Responding,
    Established,
}

struct Connection {
    stream: UnixStream,
    token: u64,
    state: ConnState,
    /// When a connection not yet established is reset.
    deadline: Option<Instant>,
    /// Guest→host bytes not yet accepted by the host socket.
    tx_buf: VecDeque<u8>,
    /// Guest→host bytes delivered to the host socket (reported as fwd_cnt).
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Host→guest bytes sent, and the guest's view of its buffer.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    host_eof: bool,
}

impl Connection {
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

struct PendingHandshake {
    stream: UnixStream,
    /// Bounded by the codec's MAX_LINE: a client that never ends its line costs no more.
    line: LineReader,
    /// A client that has not sent its line by then is refused.
    deadline: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("cannot listen on vsock socket {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("vsock epoll: {0}")]
    Epoll(io::Error),
    #[error("vsock deadline timer: {0}")]
    Timer(#[source] io::Error),
}

/// Rate limits for the warnings a guest (or a host client) can set off in a loop.
#[derive(Debug, Default)]
struct Warnings {
    tx_paused: LogLimit,
    ctrl_full: LogLimit,
    conn_cap: LogLimit,
    expired: LogLimit,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    epoll: Epoll,
    listener: UnixListener,
    timer: DeadlineTimer,
    handshakes: HashMap<u64, PendingHandshake>,
    conns: HashMap<ConnKey, Connection>,
    by_token: HashMap<u64, ConnKey>,
    /// Connections with host data (or an EOF) we could not forward yet.
    rx_pending: BTreeSet<ConnKey>,
    /// Control packets waiting for a guest RX buffer.
    ctrl: CtrlQueue<ConnKey>,
    /// process_tx stopped with packets left in the avail ring (see [`Self::tx_resumable`]).
    tx_stalled: bool,
    /// [`HANDSHAKE_TIMEOUT`] and [`CONNECT_TIMEOUT`]; tests shorten them.
    handshake_timeout: Duration,
    connect_timeout: Duration,
    next_token: u64,
    next_local_port: u32,
    scratch: Vec<u8>,
    warn: Warnings,
}

impl std::fmt::Debug for Muxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("handshakes", &self.handshakes.len())
            .field("conns", &self.conns.len())
            .field("ctrl", &self.ctrl.len())
            .finish_non_exhaustive()
    }
}

/// Connects without blocking: a host service whose listen backlog is full answers EAGAIN at
/// once (the guest gets RST) instead of stalling the device worker, which serves every stream.
/// A Unix stream connect completes or fails right here (there is no EINPROGRESS), so the only
/// wait left in a guest connect is for our RESPONSE to reach the guest.
fn connect_nonblocking(path: &str) -> io::Result<UnixStream> {
    use std::os::unix::io::FromRawFd;
    // SAFETY: plain socket(2); the fd is owned by the UnixStream right after.
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; zeroed is a valid start.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    let rc = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Answers a bad or refused handshake; the caller then closes the stream. `stream` is
/// non-blocking, but a fresh stream's socket buffer takes one short line; were it cut, the
/// client would refuse the unterminated reply all the same. What the client sent is read
/// first (a bounded amount): closing on unread data resets the stream, and the client could
/// lose the reply.
fn refuse(mut stream: &UnixStream, reason: String) {
    let _ = stream.write_all(&Reply::Err(reason).encode());
    let mut sink = [0u8; 512];
    for _ in 0..8 {
        if !matches!(stream.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
}

impl Muxer {
    /// Binds the VM's socket at `uds_path` (a stale socket file is replaced).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        let listen_err = |source| MuxerError::Listen { path: uds_path.to_path_buf(), source };
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(uds_path).map_err(listen_err)?;
            }
        }
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        epoll
            .ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_LISTENER))
            .map_err(MuxerError::Epoll)?;
        let timer = DeadlineTimer::new().map_err(MuxerError::Timer)?;
        epoll
            .ctl(ControlOperation::Add, timer.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_TIMER))
            .map_err(MuxerError::Timer)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            epoll,
            listener,
            timer,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_token: HashMap::new(),
            rx_pending: BTreeSet::new(),
            ctrl: CtrlQueue::new(MAX_PENDING_CTRL),
            tx_stalled: false,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            scratch: vec![0u8; MAX_PAYLOAD as usize],
            warn: Warnings::default(),
        })
    }

    /// The muxer's epoll; the worker nests it in its own and calls [`Self::handle_events`].
    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Control packets waiting for guest RX buffers (at most [`MAX_PENDING_CTRL`]).
    pub fn pending_ctrl(&self) -> usize {
        self.ctrl.len()
    }

    /// Whether [`Self::process_tx`] left packets in the avail ring for want of RX buffers and
    /// RX delivery has since made room: the caller must run it again, as the guest, having
    /// notified the queue already, will not do so for those packets.
    pub fn tx_resumable(&self) -> bool {
        self.tx_stalled && self.ctrl.len() < CTRL_BACKLOG
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn watch(&self, fd: i32, token: u64, events: EventSet) {
        let ev = EpollEvent::new(events | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP, token);
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
            tracing::warn!("vsock: epoll add: {e}");
        }
    }

    fn header(&self, key: ConnKey, op: u16) -> PacketHeader {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
            ..Default::default()
        }
    }

    fn queue_ctrl(&mut self, key: ConnKey, op: u16, flags: u32) {
        let mut h = self.header(key, op);
        h.flags = flags;
        if let Err(e) = self.ctrl.push(key, h) {
            // Not reached (see MAX_PENDING_CTRL); were it, dropping beats growing.
            if let Some(held_back) = self.warn.ctrl_full.check() {
                tracing::warn!(held_back, "vsock: {e}; op {op} to guest port {} dropped", key.peer_port);
            }
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            let _ = self.epoll.ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
            self.by_token.remove(&c.token);
        }
        self.rx_pending.remove(&key);
    }

    /// Tears a connection down and tells the guest.
    fn reset(&mut self, key: ConnKey) {
        self.remove(key);
        self.queue_ctrl(key, OP_RST, 0);
    }

    /// Adds a connection that is not established yet: it gets [`Self::connect_timeout`].
    fn insert(&mut self, key: ConnKey, stream: UnixStream, state: ConnState, peer: Option<&PacketHeader>) {
        let token = self.alloc_token();
        self.watch(stream.as_raw_fd(), token, EventSet::IN | EventSet::OUT);
        let (peer_buf_alloc, peer_fwd_cnt) = peer.map_or((0, 0), |h| (h.buf_alloc, h.fwd_cnt));
        let now = Instant::now();
        let deadline = now + self.connect_timeout;
        self.timer.arm_by(deadline, now);
        self.by_token.insert(token, key);
        self.conns.insert(
            key,
            Connection {
                stream,
                token,
                state,
                deadline: Some(deadline),
                tx_buf: VecDeque::new(),
                fwd_cnt: 0,
                last_fwd_cnt_sent: 0,
                rx_cnt: 0,
                peer_buf_alloc,
                peer_fwd_cnt,
                guest_shut_send: false,
                guest_shut_rcv: false,
                host_eof: false,
            },
        );
    }

    /// The handshake is done: data may flow, and no deadline applies any more.
    fn establish(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        c.state = ConnState::Established;
        c.deadline = None;
        // Host data may be waiting already; edge-triggered epoll would not report it again.
        self.rx_pending.insert(key);
    }

    /// Handles readiness reported by the muxer's epoll.
    pub fn handle_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => return tracing::debug!("vsock: epoll_wait: {e}"),
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == TOKEN_LISTENER {
                self.accept_all();
            } else if token == TOKEN_TIMER {
                self.expire(Instant::now());
            } else if self.handshakes.contains_key(&token) {
                self.read_handshake(token);
            } else if let Some(&key) = self.by_token.get(&token) {
                let set = ev.event_set();
                if set.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                    self.flush_tx(key);
                }
                if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
                {
                    self.rx_pending.insert(key);
                }
            }
        }
    }

    fn at_connection_cap(&mut self, who: &str) -> bool {
        if self.conns.len() + self.handshakes.len() < MAX_CONNECTIONS {
            return false;
        }
        if let Some(held_back) = self.warn.conn_cap.check() {
            tracing::warn!(held_back, "vsock: {MAX_CONNECTIONS} streams open; a {who} connect refused");
        }
        true
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue; // dropping it closes it
                    }
                    if self.at_connection_cap("host") {
                        refuse(&stream, format!("more than {MAX_CONNECTIONS} vsock streams"));
                        continue;
                    }
                    let token = self.alloc_token();
                    self.watch(stream.as_raw_fd(), token, EventSet::IN);
                    let now = Instant::now();
                    let deadline = now + self.handshake_timeout;
                    self.timer.arm_by(deadline, now);
                    self.handshakes
                        .insert(token, PendingHandshake { stream, line: LineReader::new(), deadline });
                    // The line may have arrived with the connection.
                    self.read_handshake(token);
                }
                Err(e) if is_would_block(&e) => return,
                Err(e) => return tracing::debug!("vsock: accept: {e}"),
            }
        }
    }

    fn read_handshake(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else { return };
        let mut byte = [0u8; 1];
        // Byte by byte: anything after the newline is stream data for the guest. None: the
        // stream broke, nobody to answer.
        let request = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Some(Err(HandshakeError::Unterminated)),
                Ok(_) => match hs.line.push_byte(byte[0]) {
                    Ok(None) => {}
                    Ok(Some(line)) => break Some(Request::parse_line(&line)),
                    Err(e) => break Some(Err(e)),
                },
                Err(e) if is_would_block(&e) => return,
                Err(_) => break None,
            }
        };
        let Some(hs) = self.handshakes.remove(&token) else { return };
        let _ = self.epoll.ctl(ControlOperation::Delete, hs.stream.as_raw_fd(), EpollEvent::default());
        let peer_port = match request {
            Some(Ok(Request::Connect(port))) => port,
            Some(Ok(Request::Stdio(_) | Request::Forward(_))) => {
                return refuse(&hs.stream, "expected CONNECT <port>".into())
            }
            Some(Err(e)) => return refuse(&hs.stream, e.to_string()),
            None => return,
        };
        // Our REQUEST would only join the backlog the guest is not draining.
        if self.ctrl.len() >= CTRL_BACKLOG {
            self.warn_tx_paused();
            return refuse(&hs.stream, "the guest is not taking vsock packets".into());
        }
        let key = ConnKey { local_port: self.alloc_local_port(), peer_port };
        self.insert(key, hs.stream, ConnState::Connecting, None);
        self.queue_ctrl(key, OP_REQUEST, 0);
    }

    /// A port no connection uses. Ends within MAX_CONNECTIONS + 1 tries: the range holds
    /// billions and at most MAX_CONNECTIONS are taken.
    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == p) {
                return p;
            }
        }
    }

    /// Resets connections and refuses host handshakes whose deadline is past `now`, then
    /// arms the timer for the next deadline.
    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> =
            self.handshakes.iter().filter(|(_, hs)| hs.deadline <= now).map(|(&t, _)| t).collect();
        for token in &late {
            if let Some(hs) = self.handshakes.remove(token) {
                let _ =
                    self.epoll.ctl(ControlOperation::Delete, hs.stream.as_raw_fd(), EpollEvent::default());
                refuse(&hs.stream, format!("no handshake line within {:?}", self.handshake_timeout));
            }
        }
        let stuck: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&k, _)| k)
            .collect();
        for &key in &stuck {
            if let Some(c) = self.conns.get(&key) {
                if c.state == ConnState::Connecting {
                    // The client still waits for its answer line.
                    let reason = format!(
                        "guest port {} did not answer within {:?}",
                        key.peer_port, self.connect_timeout
                    );
                    refuse(&c.stream, reason);
                }
            }
            self.reset(key);
        }
        if !late.is_empty() || !stuck.is_empty() {
            if let Some(held_back) = self.warn.expired.check() {
                tracing::warn!(
                    held_back,
                    "vsock: {} connections not established and {} host handshakes not sent in time; \
                     reset",
                    stuck.len(),
                    late.len()
                );
            }
        }
        let next = self
            .handshakes
            .values()
            .map(|hs| hs.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .min();
        self.timer.set(next, now);
    }

    /// Writes buffered guest data to the host socket; closes or resets as the state requires.
    fn flush_tx(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        while !c.tx_buf.is_empty() {
            let (a, _) = c.tx_buf.as_slices();
            match c.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    c.tx_buf.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if is_would_block(&e) => break,
                Err(_) => return self.reset(key),
            }
        }
        if c.tx_buf.is_empty() && c.tx_buf.capacity() > TX_BUF_KEEP {
            // An idle connection holds no memory for a burst long gone.
            c.tx_buf = VecDeque::new();
        }
        if c.tx_buf.is_empty() && c.guest_shut_send {
            let _ = c.stream.shutdown(Shutdown::Write);
            if c.guest_shut_rcv {
                return self.reset(key);
            }
        }
        // Tell the guest about freed buffer space once a good part of it is free again, so a
        // sender that ran out of credit does not wait for traffic that will never come.
        if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 4 {
            c.last_fwd_cnt_sent = c.fwd_cnt;
            self.queue_ctrl(key, OP_CREDIT_UPDATE, 0);
        }
    }

    fn warn_tx_paused(&mut self) {
        if let Some(held_back) = self.warn.tx_paused.check() {
            tracing::warn!(
                held_back,
                "vsock: {} control packets wait for guest RX buffers; until the guest posts some, \
                 its TX waits and host connects are refused",
                self.ctrl.len()
            );
        }
    }

    /// Consumes the packets the guest queued on TX, until the control backlog is full.
    /// Returns whether any chain was used.
    pub fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        self.tx_stalled = false;
        loop {
            // Each packet queues at most one control packet, so stopping here keeps the backlog
            // at CTRL_BACKLOG. What is left stays in the avail ring until process_rx has
            // delivered some: the guest's own RX buffers are what lets it send again.
            if self.ctrl.len() >= CTRL_BACKLOG {
                let waiting =
                    queue.avail_idx(mem, Ordering::Acquire).map_or(true, |a| a.0 != queue.next_avail());
                if waiting {
                    self.tx_stalled = true;
                    self.warn_tx_paused();
                }
                return used;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else { return used };
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut reader) => self.tx_packet(&mut reader),
                Err(e) => tracing::debug!("vsock: bad TX chain: {e}"),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::debug!("vsock: add_used: {e}");
                return used;
            }
            used = true;
        }
    }

    fn tx_packet(&mut self, reader: &mut virtio_queue::Reader<'_, ()>) {
        let Ok(h) = reader.read_obj::<PacketHeader>() else {
            return tracing::debug!("vsock: {}", PacketError::ShortHeader);
        };
        if let Err(e) = h.validate(self.guest_cid, reader.available_bytes()) {
            tracing::debug!("vsock: dropping guest packet: {e}");
            // Answer what looks like a real connection with RST; ignore forged senders.
            if !matches!(e, PacketError::BadSrcCid(_)) && h.op != OP_RST {
                self.reset(ConnKey { local_port: h.dst_port, peer_port: h.src_port });
            }
            return;
        }
        let key = ConnKey { local_port: h.dst_port, peer_port: h.src_port };
        if let Some(c) = self.conns.get_mut(&key) {
            // Every packet carries the guest's current credit.
            let (was, credit_before) = (c.peer_credit(), c.peer_buf_alloc);
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            if c.peer_credit() > was || c.peer_buf_alloc != credit_before {
                self.rx_pending.insert(key);
            }
        }
        match h.op {
            OP_REQUEST => self.guest_connect(key, &h),
            OP_RESPONSE => self.guest_accepted(key),
            OP_RW => self.guest_data(key, &h, reader),
            OP_SHUTDOWN => self.guest_shutdown(key, h.flags),
            OP_RST => self.remove(key),
            OP_CREDIT_REQUEST if self.conns.contains_key(&key) => self.queue_ctrl(key, OP_CREDIT_UPDATE, 0),
            OP_CREDIT_UPDATE => {}
            _ => self.reset(key),
        }
    }

    fn guest_connect(&mut self, key: ConnKey, h: &PacketHeader) {
        if self.conns.contains_key(&key) {
            // A REQUEST on a live connection: the guest lost track of it, so do we.
            return self.reset(key);
        }
        if self.at_connection_cap("guest") {
            return self.queue_ctrl(key, OP_RST, 0);
        }
        let path = format!("{}_{}", self.uds_path.display(), key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                self.insert(key, stream, ConnState::Responding, Some(h));
                self.queue_ctrl(key, OP_RESPONSE, 0);
            }
            Err(e) => {
                tracing::debug!("vsock: guest connect to {path}: {e}");
                self.queue_ctrl(key, OP_RST, 0);
            }
        }
    }

    fn guest_accepted(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else { return self.queue_ctrl(key, OP_RST, 0) };
        if c.state != ConnState::Connecting {
            return self.reset(key);
        }
        if c.stream.write_all(&Reply::Ok(Some(key.local_port)).encode()).is_err() {
            return self.reset(key);
        }
        self.establish(key);
    }

    fn guest_data(&mut self, key: ConnKey, h: &PacketHeader, reader: &mut virtio_queue::Reader<'_, ()>) {
        let Some(c) = self.conns.get_mut(&key) else { return self.queue_ctrl(key, OP_RST, 0) };
        if c.state != ConnState::Established || c.guest_shut_send {
            return self.reset(key);
        }
        let len = h.len as usize;
        // The guest must stay within the credit we gave it.
        if c.tx_buf.len() + len > BUF_ALLOC as usize {
            tracing::debug!("vsock: guest overran its credit");
            return self.reset(key);
        }
        let buf = &mut self.scratch[..len];
        if reader.read_exact(buf).is_err() {
            return self.reset(key);
        }
        c.tx_buf.extend(buf.iter());
        self.flush_tx(key);
    }

    fn guest_shutdown(&mut self, key: ConnKey, flags: u32) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        c.guest_shut_rcv |= flags & SHUTDOWN_RCV != 0;
        c.guest_shut_send |= flags & SHUTDOWN_SEND != 0;
        self.flush_tx(key);
    }

    /// Fills guest RX buffers: control packets first, then host data within the guest's
    /// credit. Returns whether any chain was used.
    pub fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        loop {
            if let Some((key, h)) = self.ctrl.front() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else { return used };
                let head = chain.head_index();
                let ok = chain.writer(mem).ok().and_then(|mut w| w.write_obj(h).ok()).is_some();
                if !ok {
                    // Lost with the buffer; a lost RESPONSE or REQUEST runs into its deadline.
                    tracing::debug!("vsock: RX buffer too small for a header");
                }
                self.ctrl.pop_front();
                if ok
                    && h.op == OP_RESPONSE
                    && self.conns.get(&key).is_some_and(|c| c.state == ConnState::Responding)
                {
                    self.establish(key);
                }
                if queue.add_used(mem, head, if ok { HDR_LEN as u32 } else { 0 }).is_err() {
                    return used;
                }
                used = true;
                continue;
            }
            let Some(key) = self.next_rx_ready() else { return used };
            let Some(chain) = queue.pop_descriptor_chain(mem) else { return used };
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut w) => self.rx_data(key, &mut w),
                Err(_) => Some(0),
            };
            match written {
                Some(n) => {
                    if queue.add_used(mem, head, n).is_err() {
                        return used;
                    }
                    used = true;
                }
                // Nothing to send after all: give the buffer back.
                None => queue.go_to_previous_position(),
            }
        }
    }

    /// A connection that has something for the guest and credit to send it.
    fn next_rx_ready(&mut self) -> Option<ConnKey> {
        let keys: Vec<ConnKey> = self.rx_pending.iter().copied().collect();
        for key in keys {
            let Some(c) = self.conns.get(&key) else {
                self.rx_pending.remove(&key);
                continue;
            };
            if c.state != ConnState::Established || c.guest_shut_rcv {
                self.rx_pending.remove(&key);
                continue;
            }
            if c.host_eof {
                self.rx_pending.remove(&key);
                continue;
            }
            if c.peer_credit() > 0 {
                return Some(key);
            }
            // No credit: stays pending until a credit update arrives.
        }
        None
    }

    /// Reads host data into one RX buffer. `None`: nothing to send (buffer unused).
    fn rx_data(&mut self, key: ConnKey, w: &mut virtio_queue::Writer<'_, ()>) -> Option<u32> {
        let mut hdr = self.header(key, OP_RW);
        let c = self.conns.get_mut(&key)?;
        let Some(room) = w.available_bytes().checked_sub(HDR_LEN).filter(|&r| r > 0) else {
            // No room for a header and data (a read-only or tiny buffer): complete it empty, as
            // for control packets. Handing it back would have process_rx pick it again forever.
            tracing::debug!("vsock: RX buffer too small for data");
            return Some(0);
        };
        let max = room.min(c.peer_credit() as usize).min(MAX_PAYLOAD as usize);
        let n = match c.stream.read(&mut self.scratch[..max]) {
            Ok(0) => {
                // Host closed its side: tell the guest it will get no more data.
                c.host_eof = true;
                self.rx_pending.remove(&key);
                self.queue_ctrl(key, OP_SHUTDOWN, SHUTDOWN_SEND);
                return None;
            }
            Ok(n) => n,
            Err(e) if is_would_block(&e) => {
                self.rx_pending.remove(&key);
                return None;
            }
            Err(_) => {
                self.reset(key);
                return None;
            }
        };
        c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
        c.last_fwd_cnt_sent = c.fwd_cnt;
        hdr.len = n as u32;
        if w.write_obj(hdr).is_err() || w.write_all(&self.scratch[..n]).is_err() {
            // The guest's buffer was bad; the data is lost, so the stream is too.
            self.reset(key);
            return Some(0);
        }
        Some((HDR_LEN + n) as u32)
    }

    /// Whether control packets or host data are waiting for guest buffers.
    pub fn has_rx_work(&self) -> bool {
        !self.ctrl.is_empty() || !self.rx_pending.is_empty()
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
