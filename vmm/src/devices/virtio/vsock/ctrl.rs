//! Control packets (REQUEST, RESPONSE, RST, SHUTDOWN, CREDIT_UPDATE) waiting for guest RX
//! buffers. Bounded by construction: one entry per connection key at most (a newer packet for
//! a key merges into the waiting one, see `merge`) and a hard cap on all of them, so a guest
//! that sends packet after packet and posts no RX buffers cannot grow it.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use super::packet::{PacketHeader, OP_CREDIT_UPDATE, OP_RST};

/// A packet refused because the queue is at its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{cap} control packets already wait for guest RX buffers")]
pub struct CtrlFull {
    pub cap: usize,
}

#[derive(Debug)]
pub struct CtrlQueue<K> {
    /// Keys in the order their packets were first queued; each key once.
    order: VecDeque<K>,
    pending: HashMap<K, PacketHeader>,
    cap: usize,
}

/// Folds `new` into the packet `old` waiting for the same connection. Every packet carries the
/// sender's credit (buf_alloc, fwd_cnt), so a CREDIT_UPDATE only refreshes those figures in
/// whatever already waits (a REQUEST or RESPONSE must not be lost to it); anything else is the
/// connection's newer state and replaces the old packet (an RST supersedes all). The muxer
/// queues a SHUTDOWN only while nothing waits (host data, hence EOF, goes out after every
/// control packet), so it never displaces a handshake packet.
fn merge(old: &mut PacketHeader, new: PacketHeader) {
    if new.op == OP_CREDIT_UPDATE && old.op != OP_RST {
        old.buf_alloc = new.buf_alloc;
        old.fwd_cnt = new.fwd_cnt;
    } else {
        *old = new;
    }
}

impl<K: Copy + Eq + Hash> CtrlQueue<K> {
    pub fn new(cap: usize) -> Self {
        Self { order: VecDeque::new(), pending: HashMap::new(), cap }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Queues `h` for `key`, merged with the packet already waiting for `key` if there is one
    /// (which keeps its place). Fails only for a new key when the queue is at its cap.
    pub fn push(&mut self, key: K, h: PacketHeader) -> Result<(), CtrlFull> {
        if let Some(old) = self.pending.get_mut(&key) {
            merge(old, h);
            return Ok(());
        }
        if self.order.len() >= self.cap {
            return Err(CtrlFull { cap: self.cap });
        }
        self.order.push_back(key);
        self.pending.insert(key, h);
        Ok(())
    }

    pub fn front(&self) -> Option<(K, PacketHeader)> {
        let key = *self.order.front()?;
        self.pending.get(&key).map(|h| (key, *h))
    }

    pub fn pop_front(&mut self) -> Option<(K, PacketHeader)> {
        let key = self.order.pop_front()?;
        self.pending.remove(&key).map(|h| (key, h))
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::{OP_REQUEST, OP_RESPONSE, OP_SHUTDOWN};
    use super::*;

    fn pkt(op: u16, fwd_cnt: u32) -> PacketHeader {
        PacketHeader { op, fwd_cnt, ..Default::default() }
    }

    #[test]
    fn one_entry_per_key_in_first_queued_order() {
        let mut q = CtrlQueue::new(8);
        q.push(1u32, pkt(OP_RESPONSE, 0)).unwrap();
        q.push(2, pkt(OP_RST, 0)).unwrap();
        for i in 0..10_000 {
            q.push(1, pkt(OP_CREDIT_UPDATE, i)).unwrap();
            q.push(2, pkt(OP_RST, 0)).unwrap();
        }
        assert_eq!(q.len(), 2);
        // A credit update does not displace the RESPONSE; its figures ride along.
        let (k, h) = q.pop_front().unwrap();
        assert_eq!((k, { h.op }, { h.fwd_cnt }), (1, OP_RESPONSE, 9_999));
        assert_eq!(q.pop_front().map(|(k, h)| (k, h.op)), Some((2, OP_RST)));
        assert!(q.pop_front().is_none() && q.is_empty());
    }

    #[test]
    fn newer_state_replaces_older() {
        let mut q = CtrlQueue::new(8);
        q.push(1u32, pkt(OP_REQUEST, 0)).unwrap();
        q.push(1, pkt(OP_RST, 0)).unwrap();
        assert_eq!(q.front().map(|(_, h)| h.op), Some(OP_RST));
        // A credit update for a key whose RST waits (a new connection on the same key) wins.
        q.push(1, pkt(OP_CREDIT_UPDATE, 5)).unwrap();
        assert_eq!(q.front().map(|(_, h)| h.op), Some(OP_CREDIT_UPDATE));
        q.push(1, pkt(OP_SHUTDOWN, 6)).unwrap();
        assert_eq!(q.front().map(|(_, h)| (h.op, h.fwd_cnt)), Some((OP_SHUTDOWN, 6)));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn hard_cap_refuses_new_keys_only() {
        let mut q = CtrlQueue::new(3);
        for k in 0..3u32 {
            q.push(k, pkt(OP_RST, 0)).unwrap();
        }
        assert_eq!(q.push(3, pkt(OP_RST, 0)), Err(CtrlFull { cap: 3 }));
        // Keys already waiting still merge.
        q.push(0, pkt(OP_RESPONSE, 0)).unwrap();
        assert_eq!(q.len(), 3);
        q.pop_front();
        q.push(3, pkt(OP_RST, 0)).unwrap();
        assert_eq!(q.len(), 3);
    }
}
