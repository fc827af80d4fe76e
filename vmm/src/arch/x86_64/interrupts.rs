//! Local APIC wiring at reset: LINT0 as ExtINT (the legacy PIC path) and LINT1 as NMI, as
//! firmware would leave it.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, v) in b.iter_mut().enumerate() {
        *v = lapic.regs[offset + i] as u8;
    }
    u32::from_le_bytes(b)
}

fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, v) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *v as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = get_reg(lapic, APIC_LVT0);
    set_reg(lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(lapic, APIC_LVT1);
    set_reg(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut lapic = vcpu.get_lapic()?;
    set_lint(&mut lapic);
    vcpu.set_lapic(&lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_modes() {
        let mut l = kvm_lapic_state::default();
        set_reg(&mut l, APIC_LVT0, 0x0001_0700);
        set_lint(&mut l);
        assert_eq!(get_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_reg(&l, APIC_LVT1) >> 8 & 7, APIC_MODE_NMI);
    }
}
