//! The virtio-net header (`virtio_net_hdr_v1`, spec 5.1.6) in front of every frame, both ways,
//! and the checks a guest's header passes before the frame reaches the tap.
//!
//! The tap (with `IFF_VNET_HDR` and a header size of 12) takes the same layout, so a checked
//! header goes through unchanged; the kernel then does the segmentation and checksums it asks
//! for. Anything the kernel would have to guess about is refused here first.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Bytes of `virtio_net_hdr_v1`: what VIRTIO_F_VERSION_1 devices always use.
pub const HDR_LEN: usize = 12;
/// Ethernet header: a frame shorter than this carries nothing.
pub const ETH_HLEN: usize = 14;
/// The largest frame either way, header excluded: a 64 KiB GSO packet plus its Ethernet and
/// VLAN headers (what the spec asks buffers to hold with GUEST_TSO and no mergeable buffers).
pub const MAX_FRAME: usize = 65_550;

/// What the driver may ask of the tap, from the negotiated features.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOffloads {
    /// NET_F_CSUM: frames may leave the checksum to the host.
    pub csum: bool,
    /// NET_F_HOST_TSO4 / HOST_TSO6: TCP segmentation.
    pub tso4: bool,
    pub tso6: bool,
    /// NET_F_HOST_ECN: TSO with the ECN bit.
    pub ecn: bool,
}

/// A header as the guest wrote it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HdrError {
    #[error("frame of {0} bytes is shorter than the header and an Ethernet header")]
    Short(usize),
    #[error("header flags {0:#x} are not NEEDS_CSUM")]
    Flags(u8),
    #[error("checksum offload requested but not negotiated")]
    CsumNotNegotiated,
    #[error("checksum at {start}+{offset} lies outside a {len}-byte packet")]
    CsumRange { start: u16, offset: u16, len: usize },
    #[error("GSO type {0:#x} not negotiated")]
    GsoType(u8),
    #[error("GSO without NEEDS_CSUM")]
    GsoWithoutCsum,
    #[error("GSO segment size 0")]
    GsoSize,
    #[error("GSO header length {hdr_len} beyond a {len}-byte packet")]
    GsoHdrLen { hdr_len: u16, len: usize },
}

impl NetHdr {
    /// Reads the header at the front of `frame` (which must hold at least [`HDR_LEN`] bytes).
    pub fn parse(frame: &[u8]) -> Option<Self> {
        let b = frame.get(..HDR_LEN)?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        })
    }

    pub fn write(&self, out: &mut [u8]) {
        if out.len() < HDR_LEN {
            return;
        }
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        out[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
    }
}

/// Checks the header of a guest frame (`frame` = header + packet) against what was
/// negotiated, and clears `num_buffers` (RX-only) so the tap sees a clean header.
pub fn check_tx(frame: &mut [u8], offloads: TxOffloads) -> Result<NetHdr, HdrError> {
    if frame.len() < HDR_LEN + ETH_HLEN {
        return Err(HdrError::Short(frame.len()));
    }
    let mut h = NetHdr::parse(frame).ok_or(HdrError::Short(frame.len()))?;
    let len = frame.len() - HDR_LEN;
    let needs_csum = u32::from(h.flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
    // DATA_VALID is for received frames, RSC_INFO needs a feature husk does not offer.
    if u32::from(h.flags) & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        return Err(HdrError::Flags(h.flags));
    }
    if needs_csum {
        if !offloads.csum {
            return Err(HdrError::CsumNotNegotiated);
        }
        let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
        if end > len {
            return Err(HdrError::CsumRange { start: h.csum_start, offset: h.csum_offset, len });
        }
    }
    let ecn = u32::from(h.gso_type) & VIRTIO_NET_HDR_GSO_ECN != 0;
    let gso = u32::from(h.gso_type) & !VIRTIO_NET_HDR_GSO_ECN;
    let allowed = match gso {
        VIRTIO_NET_HDR_GSO_NONE => !ecn,
        VIRTIO_NET_HDR_GSO_TCPV4 => offloads.tso4 && (!ecn || offloads.ecn),
        VIRTIO_NET_HDR_GSO_TCPV6 => offloads.tso6 && (!ecn || offloads.ecn),
        _ => false,
    };
    if !allowed {
        return Err(HdrError::GsoType(h.gso_type));
    }
    if gso != VIRTIO_NET_HDR_GSO_NONE {
        if !needs_csum {
            return Err(HdrError::GsoWithoutCsum);
        }
        if h.gso_size == 0 {
            return Err(HdrError::GsoSize);
        }
        if usize::from(h.hdr_len) > len {
            return Err(HdrError::GsoHdrLen { hdr_len: h.hdr_len, len });
        }
    }
    h.num_buffers = 0;
    h.write(frame);
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(h: NetHdr, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN + payload];
        h.write(&mut f);
        f
    }

    const ALL: TxOffloads = TxOffloads { csum: true, tso4: true, tso6: true, ecn: true };

    #[test]
    fn plain_and_offloaded_frames_pass() {
        assert!(check_tx(&mut frame(NetHdr::default(), 60), TxOffloads::default()).is_ok());
        let csum = NetHdr { flags: 1, csum_start: 34, csum_offset: 16, ..Default::default() };
        assert!(check_tx(&mut frame(csum, 60), ALL).is_ok());
        let tso = NetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 7,
        };
        let mut f = frame(tso, 9000);
        let h = check_tx(&mut f, ALL).expect("tso");
        assert_eq!(h.num_buffers, 0);
        assert_eq!(NetHdr::parse(&f).expect("hdr").num_buffers, 0, "num_buffers is cleared for the tap");
    }

    #[test]
    fn hostile_headers_are_refused() {
        let cases = [
            (NetHdr { flags: 2, ..Default::default() }, ALL, "DATA_VALID on TX"),
            (NetHdr { flags: 0x80, ..Default::default() }, ALL, "unknown flag"),
            (
                NetHdr { flags: 1, csum_start: 34, csum_offset: 16, ..Default::default() },
                TxOffloads::default(),
                "csum not negotiated",
            ),
            (
                NetHdr { flags: 1, csum_start: 60, csum_offset: 0, ..Default::default() },
                ALL,
                "csum past the end",
            ),
            (
                NetHdr { flags: 1, csum_start: u16::MAX, csum_offset: u16::MAX, ..Default::default() },
                ALL,
                "csum overflow",
            ),
            (
                NetHdr {
                    flags: 1,
                    gso_type: 3,
                    gso_size: 100,
                    csum_start: 34,
                    csum_offset: 6,
                    ..Default::default()
                },
                ALL,
                "UFO",
            ),
            (
                NetHdr {
                    flags: 1,
                    gso_type: 5,
                    gso_size: 100,
                    csum_start: 34,
                    csum_offset: 6,
                    ..Default::default()
                },
                ALL,
                "USO",
            ),
            (
                NetHdr {
                    flags: 1,
                    gso_type: 1,
                    gso_size: 100,
                    csum_start: 34,
                    csum_offset: 16,
                    ..Default::default()
                },
                TxOffloads { csum: true, ..Default::default() },
                "TSO not negotiated",
            ),
            (NetHdr { flags: 0, gso_type: 1, gso_size: 100, ..Default::default() }, ALL, "GSO without csum"),
            (
                NetHdr {
                    flags: 1,
                    gso_type: 1,
                    gso_size: 0,
                    csum_start: 34,
                    csum_offset: 16,
                    ..Default::default()
                },
                ALL,
                "GSO size 0",
            ),
            (
                NetHdr {
                    flags: 1,
                    gso_type: 1,
                    gso_size: 100,
                    hdr_len: 61,
                    csum_start: 34,
                    csum_offset: 16,
                    ..Default::default()
                },
                ALL,
                "hdr_len too long",
            ),
            (NetHdr { gso_type: 0x80, ..Default::default() }, ALL, "ECN without GSO"),
            (
                NetHdr {
                    flags: 1,
                    gso_type: 0x81,
                    gso_size: 100,
                    csum_start: 34,
                    csum_offset: 16,
                    ..Default::default()
                },
                TxOffloads { ecn: false, ..ALL },
                "ECN not negotiated",
            ),
        ];
        for (h, off, what) in cases {
            assert!(check_tx(&mut frame(h, 60), off).is_err(), "{what} passed");
        }
        assert_eq!(check_tx(&mut [0u8; 20], ALL), Err(HdrError::Short(20)));
    }
}
