//! The virtio-vsock packet header (spec 5.10.6) and what we accept in it.

use vm_memory::ByteValued;

pub const HDR_LEN: usize = std::mem::size_of::<PacketHeader>();
/// The host's CID; guests reach the host by connecting to it.
pub const HOST_CID: u64 = 2;
/// Largest payload we accept or send in one packet (the Linux driver uses at most 64 KiB).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

// SAFETY: packed plain-old-data; every bit pattern is a valid header.
unsafe impl ByteValued for PacketHeader {}

/// Why a guest packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("descriptor chain shorter than a packet header")]
    ShortHeader,
    #[error("source CID {0} is not the guest's")]
    BadSrcCid(u64),
    #[error("destination CID {0} is not the host")]
    BadDstCid(u64),
    #[error("unsupported socket type {0}")]
    BadType(u16),
    #[error("unknown operation {0}")]
    BadOp(u16),
    #[error("payload length {0} exceeds the limit")]
    TooLong(u32),
    #[error("payload length {len} but only {avail} bytes follow the header")]
    Truncated { len: u32, avail: usize },
}

impl PacketHeader {
    /// Checks a header from the guest. Which errors still deserve an RST reply is decided by
    /// the caller: a forged source CID gets silence.
    pub fn validate(&self, guest_cid: u64, payload_avail: usize) -> Result<(), PacketError> {
        let h = *self;
        if h.src_cid != guest_cid {
            return Err(PacketError::BadSrcCid(h.src_cid));
        }
        if h.dst_cid != HOST_CID {
            return Err(PacketError::BadDstCid(h.dst_cid));
        }
        if h.type_ != TYPE_STREAM {
            return Err(PacketError::BadType(h.type_));
        }
        if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&{ h.op }) {
            return Err(PacketError::BadOp(h.op));
        }
        if h.op == OP_RW {
            if h.len > MAX_PAYLOAD {
                return Err(PacketError::TooLong(h.len));
            }
            if h.len as usize > payload_avail {
                return Err(PacketError::Truncated { len: h.len, avail: payload_avail });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            type_: TYPE_STREAM,
            op: OP_RW,
            len: 10,
            ..Default::default()
        }
    }

    #[test]
    fn header_is_44_bytes() {
        assert_eq!(HDR_LEN, 44);
    }

    #[test]
    fn validation() {
        assert_eq!(good().validate(3, 10), Ok(()));
        assert_eq!(good().validate(4, 10), Err(PacketError::BadSrcCid(3)));
        assert_eq!(PacketHeader { dst_cid: 7, ..good() }.validate(3, 10), Err(PacketError::BadDstCid(7)));
        assert_eq!(PacketHeader { type_: 2, ..good() }.validate(3, 10), Err(PacketError::BadType(2)));
        assert_eq!(PacketHeader { op: 0, ..good() }.validate(3, 10), Err(PacketError::BadOp(0)));
        assert_eq!(PacketHeader { op: 99, ..good() }.validate(3, 10), Err(PacketError::BadOp(99)));
        assert_eq!(
            PacketHeader { len: u32::MAX, ..good() }.validate(3, usize::MAX),
            Err(PacketError::TooLong(u32::MAX))
        );
        assert_eq!(good().validate(3, 9), Err(PacketError::Truncated { len: 10, avail: 9 }));
        // Control packets may carry a bogus len; it is ignored.
        assert_eq!(PacketHeader { op: OP_REQUEST, len: 5000, ..good() }.validate(3, 0), Ok(()));
    }
}
