//! The state file: a fixed 32-byte header, then a JSON payload.
//!
//! ```text
//! 0   8  magic "HUSKSNAP"
//! 8   4  format version (LE)
//! 12  4  reserved, zero
//! 16  8  payload length (LE)
//! 24  4  CRC32 of the payload
//! 28  4  CRC32 of bytes 0..28
//! 32  .. payload: the postcard form of [`Snapshot`] (serde, compact binary)
//! ```
//!
//! Every field is checked before the payload is parsed, so a foreign, truncated or corrupt
//! file gets a message saying which, and a hostile one cannot make us allocate more than
//! [`MAX_PAYLOAD`].

use super::state::Snapshot;
use super::SnapshotError;

pub const MAGIC: [u8; 8] = *b"HUSKSNAP";
/// Bumped whenever the payload's meaning changes; older or newer files are refused.
/// 2: the VMGenID device (`vmgenid`), whose tables version 1 guests never got.
/// 3: the payload is postcard, not JSON: parsing 46 KB of JSON numbers (register files, XSAVE
/// areas) took 20 ms of every restore in the test host.
pub const FORMAT_VERSION: u32 = 3;
pub const HEADER_LEN: usize = 32;
/// Far above any real state (a few hundred KiB for 254 vCPUs), far below harm.
pub const MAX_PAYLOAD: u64 = 64 << 20;

pub fn encode(snap: &Snapshot) -> Result<Vec<u8>, SnapshotError> {
    let payload = postcard::to_stdvec(snap).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let header_crc = crc32fast::hash(&out[..28]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Checks the header of a file whose total length is `file_len`; returns the payload length.
pub fn check_header(header: &[u8], file_len: u64) -> Result<u64, SnapshotError> {
    if header.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated { expected: HEADER_LEN as u64, found: header.len() as u64 });
    }
    if header[..8] != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    if le32(&header[28..]) != crc32fast::hash(&header[..28]) {
        return Err(SnapshotError::Corrupt("header checksum mismatch".into()));
    }
    let version = le32(&header[8..]);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { found: version, supported: FORMAT_VERSION });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::Corrupt(format!("payload length {len} exceeds {MAX_PAYLOAD}")));
    }
    let expected = HEADER_LEN as u64 + len;
    if file_len < expected {
        return Err(SnapshotError::Truncated { expected, found: file_len });
    }
    if file_len > expected {
        return Err(SnapshotError::Corrupt(format!("{} bytes after the payload", file_len - expected)));
    }
    Ok(len)
}

pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    let len = check_header(bytes, bytes.len() as u64)?;
    let payload = &bytes[HEADER_LEN..HEADER_LEN + len as usize];
    if crc32fast::hash(payload) != le32(&bytes[24..]) {
        return Err(SnapshotError::Corrupt("payload checksum mismatch".into()));
    }
    // Every byte of the payload must belong to the state: anything left over is corruption.
    match postcard::take_from_bytes(payload) {
        Ok((snap, [])) => Ok(snap),
        Ok((_, rest)) => {
            Err(SnapshotError::Corrupt(format!("payload: {} bytes after the state", rest.len())))
        }
        Err(e) => Err(SnapshotError::Corrupt(format!("payload: {e}"))),
    }
}

/// Reads and decodes a state file, never reading more than the header allows.
pub fn read(path: &std::path::Path) -> Result<Snapshot, SnapshotError> {
    use std::io::Read;
    let io = |source| SnapshotError::Io { what: "read state file", source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut header = Vec::with_capacity(HEADER_LEN);
    (&mut f).take(HEADER_LEN as u64).read_to_end(&mut header).map_err(io)?;
    let len = check_header(&header, file_len)?;
    let mut bytes = header;
    bytes.reserve_exact(len as usize);
    f.take(len).read_to_end(&mut bytes).map_err(io)?;
    decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample_snapshot;
    use super::*;

    #[test]
    fn round_trip() {
        let snap = sample_snapshot();
        let bytes = encode(&snap).unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!(back.identity, snap.identity);
        assert_eq!(back.devices, snap.devices);
        assert_eq!(back.vcpus[0].regs.rip, snap.vcpus[0].regs.rip);
        assert_eq!(back.vcpus[0].msrs.len(), snap.vcpus[0].msrs.len());
        assert_eq!(back.vm.clock.clock, snap.vm.clock.clock);
    }

    #[test]
    fn truncation_at_every_length_is_refused() {
        let bytes = encode(&sample_snapshot()).unwrap();
        for cut in (0..bytes.len()).step_by(97).chain([HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1]) {
            match decode(&bytes[..cut]) {
                Err(SnapshotError::Truncated { .. }) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn foreign_corrupt_and_other_versions_are_refused() {
        let good = encode(&sample_snapshot()).unwrap();
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(decode(&b), Err(SnapshotError::NotASnapshot)));
        assert!(matches!(
            decode(b"\x7fELF and then some bytes to pass the header length"),
            Err(SnapshotError::NotASnapshot)
        ));
        // A flipped payload byte.
        let mut b = good.clone();
        let mid = HEADER_LEN + (b.len() - HEADER_LEN) / 2;
        b[mid] ^= 0x20;
        assert!(matches!(decode(&b), Err(SnapshotError::Corrupt(m)) if m.contains("payload checksum")));
        // A header field changed without its checksum.
        let mut b = good.clone();
        b[16] ^= 1;
        assert!(matches!(decode(&b), Err(SnapshotError::Corrupt(m)) if m.contains("header checksum")));
        // Another format version with a valid header checksum.
        let mut b = good.clone();
        b[8..12].copy_from_slice(&7u32.to_le_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&b), Err(SnapshotError::Version { found: 7, .. })));
        // A huge announced payload is refused before any allocation.
        let mut b = good.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&b), Err(SnapshotError::Corrupt(m)) if m.contains("exceeds")));
        // Trailing garbage.
        let mut b = good.clone();
        b.push(0);
        assert!(matches!(decode(&b), Err(SnapshotError::Corrupt(m)) if m.contains("after the payload")));
        // Valid checksums around a payload that is not a snapshot.
        let mut b = good[..HEADER_LEN].to_vec();
        let payload = b"{\"identity\": 3}";
        b[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        b[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(payload);
        assert!(matches!(decode(&b), Err(SnapshotError::Corrupt(m)) if m.contains("payload:")));
    }

    /// `payload` framed with a valid header and checksums.
    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut b = encode(&sample_snapshot()).unwrap()[..HEADER_LEN].to_vec();
        b[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        b[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn a_payload_with_bytes_past_the_state_is_refused() {
        let mut payload = encode(&sample_snapshot()).unwrap()[HEADER_LEN..].to_vec();
        payload.extend_from_slice(&[0, 0, 0]);
        let e = decode(&framed(&payload)).unwrap_err();
        assert!(matches!(&e, SnapshotError::Corrupt(m) if m.contains("3 bytes after the state")), "{e}");
    }

    #[test]
    fn hostile_payloads_with_valid_checksums_never_panic() {
        // Every byte of a real payload changed in turn (lengths, tags and counts among them),
        // checksums made valid again: each decodes or is refused, without a panic or a huge
        // allocation (a length prefix cannot claim more than the bytes that follow).
        let payload = encode(&sample_snapshot()).unwrap()[HEADER_LEN..].to_vec();
        for i in 0..payload.len() {
            for v in [0x00, 0xff, payload[i] ^ 0x80] {
                let mut p = payload.clone();
                p[i] = v;
                let _ = decode(&framed(&p));
            }
        }
        for cut in 0..payload.len() {
            assert!(decode(&framed(&payload[..cut])).is_err(), "cut at {cut}");
        }
    }
}
