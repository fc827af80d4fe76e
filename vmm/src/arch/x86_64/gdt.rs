//! Segment descriptors for the boot GDT, and their KVM register form.

use kvm_bindings::kvm_segment;

/// Descriptor access/flag nibbles used at boot.
pub const CODE64: u16 = 0xa09b; // present, ring 0, code, L=1, G=1
pub const CODE32: u16 = 0xc09b; // present, ring 0, code, D=1, G=1
pub const DATA: u16 = 0xc093; // present, ring 0, data rw, B=1, G=1
pub const TSS: u16 = 0x008b; // present, busy 32-bit TSS

/// Encodes a GDT entry from flags (access byte + high nibble flags), base and limit.
pub fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

fn base(e: u64) -> u64 {
    ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000)
}

fn limit(e: u64) -> u32 {
    let raw = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    // With the granularity bit the limit counts 4 KiB pages.
    if (e >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The KVM segment register value for GDT entry `e` at index `index`.
pub fn kvm_segment_from(index: u8, e: u64) -> kvm_segment {
    kvm_segment {
        base: base(e),
        limit: limit(e),
        selector: u16::from(index) * 8,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g: ((e >> 55) & 1) as u8,
        avl: ((e >> 52) & 1) as u8,
        padding: 0,
        unusable: (((e >> 47) & 1) == 0) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_round_trips() {
        let e = entry(CODE64, 0, 0xfffff);
        let s = kvm_segment_from(1, e);
        assert_eq!((s.selector, s.type_, s.present, s.l, s.db, s.g, s.s), (8, 0xb, 1, 1, 0, 1, 1));
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.base, 0);
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn base_and_byte_limit() {
        let e = entry(TSS, 0x1234_5678, 0x67);
        let s = kvm_segment_from(3, e);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0x67);
        assert_eq!((s.type_, s.s, s.g), (0xb, 0, 0));
    }

    #[test]
    fn data32() {
        let s = kvm_segment_from(2, entry(DATA, 0, 0xfffff));
        assert_eq!((s.db, s.l, s.type_, s.limit), (1, 0, 3, 0xffff_ffff));
        assert_eq!(entry(0, 0, 0), 0);
        assert_eq!(kvm_segment_from(0, 0).unusable, 1);
    }
}
