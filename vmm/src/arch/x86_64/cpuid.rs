//! Per-vCPU CPUID, derived from what KVM supports on this host: topology and APIC IDs are made
//! consistent with the MADT, and the hypervisor and TSC-deadline bits are set (the latter lets
//! the guest skip LAPIC timer calibration, which needs a PIT a hardware-reduced guest lacks).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to hold `n` distinct IDs.
fn id_bits(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

fn patch_entry(e: &mut kvm_cpuid_entry2, cpu: u32, count: u32) {
    match e.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
            e.ebx = (e.ebx & 0xffff) | (cpu << 24) | (count.min(255) << 16);
            e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26]: cores per package - 1. One package of `count` single-thread cores.
            e.eax = (e.eax & 0x03ff_ffff) | ((count.saturating_sub(1) & 0x3f) << 26);
            // EAX[25:14]: logical processors sharing this cache - 1; keep it per core.
            e.eax &= !(0xfff << 14);
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            // Level 0 = SMT (1 thread per core), level 1 = core (`count` cores).
            let (shift, lps, level_type) = match e.index {
                0 => (0, 1, 1),
                1 => (id_bits(count), count, 2),
                _ => (0, 0, 0),
            };
            e.eax = shift;
            e.ebx = lps;
            e.ecx = (level_type << 8) | (e.index & 0xff);
            e.edx = cpu;
        }
        LEAF_AMD_SIZE_IDS => {
            // ECX[7:0]: cores per package - 1; ECX[15:12]: APIC ID bits for cores.
            e.ecx = (e.ecx & !0xf0ff) | (count.saturating_sub(1) & 0xff) | (id_bits(count) << 12);
        }
        _ => {}
    }
}

/// CPUID for vCPU `cpu` of `count`, from KVM's supported list.
pub fn vcpu_cpuid(supported: &CpuId, cpu: u32, count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        patch_entry(e, cpu, count);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0x0000_0800, ..Default::default() }
    }

    #[test]
    fn apic_ids_and_topology() {
        let base =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0x8000_0008, 0)]).unwrap();
        let c = vcpu_cpuid(&base, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(s[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(s[0].edx & EDX_HTT, 0);
        assert_eq!((s[1].edx, s[1].ebx), (3, 1));
        assert_eq!((s[2].edx, s[2].ebx, s[2].eax), (3, 4, 2));
        assert_eq!(s[3].ecx & 0xff, 3);
        let single = vcpu_cpuid(&base, 0, 1);
        assert_eq!(single.as_slice()[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(254), 8);
    }
}
