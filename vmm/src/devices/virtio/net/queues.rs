//! Moving frames between the virtqueues and a [`Backend`]: TX (guest → host) and RX
//! (host → guest). Pure functions over a queue and guest memory, so every hostile-guest case is
//! unit-tested through a simulated driver.
//!
//! Bounds: at most one frame waits for RX buffers (a guest that posts none stalls its own RX,
//! and the tap's kernel queue drops the rest); each call handles at most [`BATCH`] frames so
//! one busy direction cannot starve the other; a TX chain longer than one frame is dropped.

use std::io;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::header::{check_tx, TxOffloads, HDR_LEN, MAX_FRAME};
use super::Backend;
use crate::memory::GuestMem;

/// Frames one call moves at most before it returns to the event loop.
pub const BATCH: usize = 256;
/// A buffer for one frame with its header.
pub const FRAME_BUF: usize = HDR_LEN + MAX_FRAME;

/// What a TX pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxOutcome {
    /// Chains given back to the driver (sent or dropped).
    pub completed: usize,
    pub dropped: usize,
    /// The backend would block: the current chain stays queued for a retry.
    pub blocked: bool,
    /// The batch limit was hit with chains left.
    pub more: bool,
}

/// Sends the frames the driver queued. Bad chains (a device-writable descriptor, a buffer
/// outside guest memory, more than one frame) and bad headers are dropped and completed, so
/// the queue never stalls on them.
pub fn process_tx<B: Backend>(
    queue: &mut Queue,
    mem: &GuestMem,
    backend: &mut B,
    offloads: TxOffloads,
    buf: &mut Vec<u8>,
) -> TxOutcome {
    let mut out = TxOutcome::default();
    while out.completed < BATCH {
        let Some(chain) = queue.pop_descriptor_chain(mem) else { return out };
        let head = chain.head_index();
        buf.clear();
        let mut ok = true;
        for desc in chain {
            let len = desc.len() as usize;
            if desc.is_write_only() || buf.len() + len > FRAME_BUF {
                ok = false;
                break;
            }
            let at = buf.len();
            buf.resize(at + len, 0);
            if mem.read_slice(&mut buf[at..], GuestAddress(desc.addr().0)).is_err() {
                ok = false;
                break;
            }
        }
        let sent = if !ok {
            tracing::debug!("virtio-net: bad TX chain dropped");
            false
        } else {
            match check_tx(buf, offloads) {
                Err(e) => {
                    tracing::debug!("virtio-net: TX frame dropped: {e}");
                    false
                }
                Ok(_) => match backend.send(buf) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Not lost: the same chain is popped again once the tap takes more.
                        queue.go_to_previous_position();
                        out.blocked = true;
                        return out;
                    }
                    Err(e) => {
                        tracing::debug!("virtio-net: tap write: {e}");
                        false
                    }
                },
            }
        };
        if !sent {
            out.dropped += 1;
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            tracing::debug!("virtio-net: TX add_used: {e}");
            return out;
        }
        out.completed += 1;
    }
    out.more = true;
    out
}

/// The frame read from the backend that waits for RX buffers, if any.
#[derive(Debug)]
pub struct RxFrame {
    buf: Vec<u8>,
    len: usize,
}

impl Default for RxFrame {
    fn default() -> Self {
        Self { buf: vec![0; FRAME_BUF], len: 0 }
    }
}

impl RxFrame {
    pub fn pending(&self) -> bool {
        self.len > 0
    }
}

/// What an RX pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxOutcome {
    pub delivered: usize,
    pub dropped: usize,
    /// A frame waits and the driver has no room for it.
    pub out_of_buffers: bool,
    /// The backend has nothing more to read.
    pub drained: bool,
    pub more: bool,
}

enum Delivery {
    Delivered,
    NoRoom,
    Dropped,
}

/// Delivers frames from `backend` while the driver has buffers for them.
pub fn process_rx<B: Backend>(
    queue: &mut Queue,
    mem: &GuestMem,
    backend: &mut B,
    frame: &mut RxFrame,
    mergeable: bool,
) -> RxOutcome {
    let mut out = RxOutcome::default();
    let mut chains = Vec::new();
    while out.delivered + out.dropped < BATCH {
        if !frame.pending() {
            match backend.recv(&mut frame.buf) {
                Ok(Some(n)) if n > HDR_LEN => frame.len = n,
                Ok(Some(_)) => {
                    out.dropped += 1;
                    continue;
                }
                Ok(None) => {
                    out.drained = true;
                    return out;
                }
                Err(e) => {
                    tracing::debug!("virtio-net: tap read: {e}");
                    out.drained = true;
                    return out;
                }
            }
        }
        match deliver(queue, mem, &mut frame.buf[..frame.len], mergeable, &mut chains) {
            Delivery::Delivered => out.delivered += 1,
            Delivery::Dropped => out.dropped += 1,
            Delivery::NoRoom => {
                out.out_of_buffers = true;
                return out;
            }
        }
        frame.len = 0;
    }
    out.more = true;
    out
}

/// One popped RX chain: its head and its device-writable buffers.
#[derive(Debug, Default)]
struct RxChain {
    head: u16,
    bufs: Vec<(GuestAddress, usize)>,
    bad: bool,
    /// Bytes of the frame placed in it.
    written: u32,
}

/// Places one frame in the driver's buffers: one chain, or with mergeable RX buffers as many
/// as it takes (the count goes in the header's `num_buffers`). When there is not enough room
/// yet, every chain taken is put back.
fn deliver(
    queue: &mut Queue,
    mem: &GuestMem,
    frame: &mut [u8],
    mergeable: bool,
    chains: &mut Vec<RxChain>,
) -> Delivery {
    chains.clear();
    let mut room = 0usize;
    while room < frame.len() {
        if !mergeable && !chains.is_empty() {
            break;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            for _ in 0..chains.len() {
                queue.go_to_previous_position();
            }
            return Delivery::NoRoom;
        };
        let mut c = RxChain { head: chain.head_index(), ..Default::default() };
        for desc in chain {
            if !desc.is_write_only() {
                c.bad = true;
                break;
            }
            c.bufs.push((GuestAddress(desc.addr().0), desc.len() as usize));
            room = room.saturating_add(desc.len() as usize);
        }
        let bad = c.bad;
        chains.push(c);
        if bad {
            return give_back_empty(queue, mem, chains);
        }
    }
    if room < frame.len() {
        // Without mergeable buffers one chain must hold the whole frame; the buffer is put
        // back for a smaller one.
        tracing::debug!(len = frame.len(), room, "virtio-net: RX buffer too small, frame dropped");
        queue.go_to_previous_position();
        return Delivery::Dropped;
    }
    // At most a queue's worth of chains, so the count fits.
    let count = chains.len() as u16;
    frame[10..12].copy_from_slice(&count.to_le_bytes());
    let mut off = 0usize;
    for c in chains.iter_mut() {
        for &(addr, cap) in &c.bufs {
            let n = cap.min(frame.len() - off);
            if n == 0 {
                break;
            }
            if mem.write_slice(&frame[off..off + n], addr).is_err() {
                tracing::debug!("virtio-net: RX buffer outside guest memory, frame dropped");
                return give_back_empty(queue, mem, chains);
            }
            off += n;
            c.written += n as u32;
        }
    }
    for c in chains.iter() {
        if let Err(e) = queue.add_used(mem, c.head, c.written) {
            tracing::debug!("virtio-net: RX add_used: {e}");
            return Delivery::Dropped;
        }
    }
    Delivery::Delivered
}

/// Completes every taken chain with nothing in it: the frame is lost, the queue moves on.
fn give_back_empty(queue: &mut Queue, mem: &GuestMem, chains: &[RxChain]) -> Delivery {
    for c in chains {
        if queue.add_used(mem, c.head, 0).is_err() {
            break;
        }
    }
    Delivery::Dropped
}
