//! virtio-net (spec 5.1) on a tap: one RX/TX queue pair, MAC, MTU and link status in config
//! space, checksum and TSO offloads both ways through virtio-net headers the tap understands,
//! mergeable RX buffers and EVENT_IDX.
//!
//! The guest is hostile: headers are checked before a frame reaches the host kernel
//! ([`header`]), bad chains are dropped without stalling the queue, and frames wait for RX
//! buffers one at a time ([`queues`]). One queue pair: a second pays only with more vCPUs than
//! sandboxes usually get, and this device serves both directions from one thread.

pub mod header;
pub mod queues;
pub mod tap;

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::{check_queue_count, read_config_bytes, Worker};
use super::{ActivateContext, ActivateError, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1};
use crate::confine::ThreadKind;
use crate::memory::GuestMem;
use header::TxOffloads;
use queues::{process_rx, process_tx, RxFrame};
use tap::Tap;

pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
const RXQ: usize = 0;
const TXQ: usize = 1;
const TOKEN_RXQ: u64 = 0;
const TOKEN_TXQ: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_KILL: u64 = 3;

/// Where frames go on the host: a tap, or a simulated one in tests.
pub trait Backend {
    /// Reads one frame (its virtio-net header first) into `buf`; `None` when none waits.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Writes one frame (header first); `WouldBlock` when the host cannot take it now.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// What a device's frames go through: a tap it shares with its worker (the device keeps it
/// across resets), or nothing (detached: what the guest sends is dropped, nothing arrives).
#[derive(Debug, Clone)]
enum Wire {
    Tap(Arc<Tap>),
    Detached,
}

impl Backend for Wire {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self {
            Self::Tap(t) => t.recv(buf),
            Self::Detached => Ok(None),
        }
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self {
            Self::Tap(t) => t.send(frame),
            Self::Detached => Ok(()),
        }
    }
}

fn bit(b: u32) -> u64 {
    1 << b
}

/// Device features: offloads both ways, mergeable buffers, EVENT_IDX, MAC, status, and MTU
/// when one is set.
fn features(mtu: Option<u16>) -> u64 {
    let mut f = VIRTIO_F_VERSION_1
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_HOST_ECN)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_RING_F_EVENT_IDX);
    if mtu.is_some() {
        f |= bit(VIRTIO_NET_F_MTU);
    }
    f
}

/// What the guest may send to the tap, from the features it accepted.
pub fn tx_offloads(acked: u64) -> TxOffloads {
    let has = |b: u32| acked & bit(b) != 0;
    TxOffloads {
        csum: has(VIRTIO_NET_F_CSUM),
        tso4: has(VIRTIO_NET_F_HOST_TSO4),
        tso6: has(VIRTIO_NET_F_HOST_TSO6),
        ecn: has(VIRTIO_NET_F_HOST_ECN),
    }
}

/// What the tap may hand the guest (TUN_F_* bits), from the GUEST_* features it accepted.
/// Segmentation offloads need checksum offload too (spec 5.1.3.1).
pub fn tap_offloads(acked: u64) -> libc::c_uint {
    let has = |b: u32| acked & bit(b) != 0;
    let mut f = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        f |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            f |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            f |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) && f & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            f |= libc::TUN_F_TSO_ECN;
        }
    }
    f
}

#[derive(Debug)]
pub struct Net {
    wire: Wire,
    mac: [u8; 6],
    mtu: Option<u16>,
    worker: Worker,
}

impl Net {
    /// A device on `tap`, or detached without one.
    pub fn new(tap: Option<Tap>, mac: [u8; 6], mtu: Option<u16>) -> Self {
        let wire = tap.map_or(Wire::Detached, |t| Wire::Tap(Arc::new(t)));
        Self { wire, mac, mtu, worker: Worker::new("virtio-net", ThreadKind::VirtioNet) }
    }

    /// mac, status, max_virtqueue_pairs, mtu (spec 5.1.4).
    fn config(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        c
    }
}

/// One device's queues and state, served by its worker.
struct NetWorker<B: Backend> {
    mem: GuestMem,
    rxq: Queue,
    txq: Queue,
    tap: B,
    offloads: TxOffloads,
    mergeable: bool,
    rx_frame: RxFrame,
    tx_buf: Vec<u8>,
    /// The tap may have frames to read (edge-triggered: set on EPOLLIN, cleared when drained).
    tap_readable: bool,
    /// A TX frame waits for the tap to take it.
    tx_blocked: bool,
}

impl<B: Backend> NetWorker<B> {
    /// RX until the tap is drained or the guest is out of buffers; whether any was used.
    fn rx(&mut self) -> (bool, bool) {
        let mut used = false;
        // One pass with nothing done is allowed to follow a post that raced with the last
        // one; after that, a ring that yields nothing (an avail index too far ahead, or buffers
        // too few for the held frame) waits for the guest's next kick instead of spinning.
        let mut idle_retry = true;
        loop {
            let seen = self.rxq.avail_idx(&self.mem, Ordering::Acquire).map(|i| i.0).unwrap_or(0);
            let r = process_rx(&mut self.rxq, &self.mem, &mut self.tap, &mut self.rx_frame, self.mergeable);
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
            if kick_on_next_post(&mut self.rxq, &self.mem, seen)
                && (progress || std::mem::take(&mut idle_retry))
            {
                continue;
            }
            return (used, false);
        }
    }

    fn tx(&mut self) -> (bool, bool) {
        let mut used = false;
        let mut idle_retry = true;
        loop {
            let _ = self.txq.disable_notification(&self.mem);
            let r = process_tx(&mut self.txq, &self.mem, &mut self.tap, self.offloads, &mut self.tx_buf);
            let progress = r.completed + r.dropped > 0;
            used |= r.completed > 0;
            self.tx_blocked = r.blocked;
            if r.blocked || r.more {
                let _ = self.txq.enable_notification(&self.mem);
                return (used, r.more);
            }
            // As in `rx`: an avail index the queue cannot follow must not spin the worker.
            match self.txq.enable_notification(&self.mem) {
                Ok(true) if progress || std::mem::take(&mut idle_retry) => continue,
                _ => return (used, false),
            }
        }
    }
}

/// Asks the guest to notify at its next buffer post and tells whether it posted any since its
/// avail index read `seen`. virtio-queue's `enable_notification` asks (with EVENT_IDX) for a
/// kick once the avail index passes `next_avail`; when the buffers posted are too few for the
/// held frame, the guest is already past that and would never kick again, so `avail_event` is
/// set to what the guest has posted.
fn kick_on_next_post(q: &mut Queue, mem: &GuestMem, seen: u16) -> bool {
    if q.enable_notification(mem).is_err() {
        return false;
    }
    if q.event_idx_enabled() {
        // avail_event follows the used ring's header (4 bytes) and its 8-byte elements.
        let at = q.used_ring().checked_add(4 + 8 * u64::from(q.size()));
        if let Some(at) = at {
            let _ = mem.store(seen.to_le(), GuestAddress(at), Ordering::Release);
        }
    }
    fence(Ordering::SeqCst);
    q.avail_idx(mem, Ordering::Acquire).is_ok_and(|i| i.0 != seen)
}

fn run_worker(mut ctx: ActivateContext, wire: Wire, kill: EventFd) {
    let acked = ctx.acked_features;
    let event_idx = acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
    let (Some(mut txq), Some(mut rxq)) = (ctx.queues.pop(), ctx.queues.pop()) else { return };
    rxq.set_event_idx(event_idx);
    txq.set_event_idx(event_idx);
    let mut w = NetWorker {
        mem: ctx.mem.clone(),
        rxq,
        txq,
        tap: wire,
        offloads: tx_offloads(acked),
        mergeable: acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
        rx_frame: RxFrame::default(),
        tx_buf: Vec::with_capacity(queues::FRAME_BUF),
        tap_readable: true,
        tx_blocked: false,
    };
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => return tracing::error!("virtio-net: epoll: {e}"),
    };
    let mut fds = vec![
        (ctx.queue_evts[RXQ].as_raw_fd(), TOKEN_RXQ, EventSet::IN),
        (ctx.queue_evts[TXQ].as_raw_fd(), TOKEN_TXQ, EventSet::IN),
        (kill.as_raw_fd(), TOKEN_KILL, EventSet::IN),
    ];
    if let Wire::Tap(t) = &w.tap {
        fds.push((t.as_raw_fd(), TOKEN_TAP, EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED));
    }
    for (fd, token, set) in fds {
        if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, token)) {
            return tracing::error!("virtio-net: epoll_ctl: {e}");
        }
    }
    let mut events = [EpollEvent::default(); 8];
    // Work left over from a full batch: poll instead of sleeping.
    let (mut rx_more, mut tx_more) = (true, false);
    loop {
        let timeout = if rx_more || tx_more { 0 } else { -1 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return tracing::error!("virtio-net: epoll_wait: {e}"),
        };
        let (mut run_rx, mut run_tx) = (rx_more, tx_more);
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_KILL => return,
                TOKEN_RXQ => {
                    let _ = ctx.queue_evts[RXQ].read();
                    run_rx = true;
                }
                TOKEN_TXQ => {
                    let _ = ctx.queue_evts[TXQ].read();
                    run_tx = true;
                }
                TOKEN_TAP => {
                    let set = ev.event_set();
                    if set.contains(EventSet::IN) {
                        w.tap_readable = true;
                        run_rx = true;
                    }
                    if set.contains(EventSet::OUT) && w.tx_blocked {
                        run_tx = true;
                    }
                }
                _ => {}
            }
        }
        let (mut rx_used, mut tx_used) = (false, false);
        if run_tx {
            (tx_used, tx_more) = w.tx();
        }
        if run_rx && (w.tap_readable || w.rx_frame.pending()) {
            (rx_used, rx_more) = w.rx();
        } else {
            rx_more = false;
        }
        let notify = (rx_used && w.rxq.needs_notification(&w.mem).unwrap_or(true))
            | (tx_used && w.txq.needs_notification(&w.mem).unwrap_or(true));
        if notify {
            ctx.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        features(self.mtu)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        check_queue_count(&ctx, QUEUE_SIZES.len())?;
        self.reset();
        let wire = self.wire.clone();
        // On the worker: the vCPU thread that activates us may not make tap ioctls.
        self.worker.start(move |kill| {
            if let Wire::Tap(t) = &wire {
                if let Err(e) = t.set_offload(tap_offloads(ctx.acked_features)) {
                    tracing::error!("virtio-net: tap offloads: {e}; the device stays idle");
                    return;
                }
            }
            run_worker(ctx, wire, kill)
        })
    }

    fn start_threads(&mut self) -> Result<(), ActivateError> {
        self.worker.start_thread()
    }

    fn reset(&mut self) {
        self.worker.stop();
    }
}

#[cfg(test)]
mod tests;
