//! KVM's side of the state: per-vCPU registers and in-kernel LAPIC, VM-wide irqchip, PIT and
//! kvmclock, saved and set back in the order KVM needs.

use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::state::{VcpuState, VmState};
use super::{kvm_err, SnapshotError};

fn msrs(entries: &[kvm_msr_entry]) -> Result<Msrs, SnapshotError> {
    Msrs::from_entries(entries).map_err(|e| SnapshotError::Invalid(format!("MSR list: {e:?}")))
}

/// Reads every MSR in `index_list` that KVM lets us read (a few listed ones are not
/// readable on every host; those are left out, as they would be refused on restore too).
fn read_msrs(fd: &VcpuFd, index_list: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut out = Vec::with_capacity(index_list.len());
    let mut rest = index_list;
    while !rest.is_empty() {
        let n = rest.len().min(KVM_MAX_MSR_ENTRIES);
        let entries: Vec<kvm_msr_entry> =
            rest[..n].iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut m = msrs(&entries)?;
        let read = fd.get_msrs(&mut m).map_err(kvm_err("get MSRs"))?;
        out.extend_from_slice(&m.as_slice()[..read.min(n)]);
        if read < n {
            tracing::debug!(msr = rest[read], "MSR not readable; left out of the snapshot");
            rest = &rest[read + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(out)
}

/// Saves a vCPU that is out of KVM_RUN with no exit pending (see the pause in `vstate::vcpu`).
pub fn save_vcpu(fd: &VcpuFd, msr_index_list: &[u32]) -> Result<VcpuState, SnapshotError> {
    Ok(VcpuState {
        cpuid: fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("get CPUID"))?.as_slice().to_vec(),
        // MP state first: it flushes pending LAPIC events into the state read below.
        mp_state: fd.get_mp_state().map_err(kvm_err("get MP state"))?,
        regs: fd.get_regs().map_err(kvm_err("get registers"))?,
        sregs: fd.get_sregs().map_err(kvm_err("get special registers"))?,
        xsave: fd.get_xsave().map_err(kvm_err("get XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(kvm_err("get XCRs"))?,
        debugregs: fd.get_debug_regs().map_err(kvm_err("get debug registers"))?,
        lapic: fd.get_lapic().map_err(kvm_err("get LAPIC"))?,
        msrs: read_msrs(fd, msr_index_list)?,
        events: fd.get_vcpu_events().map_err(kvm_err("get vCPU events"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Sets a saved state on a fresh vCPU: CPUID before anything that depends on it, special
/// registers before MSRs (EFER), LAPIC before events, and MSRs (which include the TSC) last
/// but one.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), SnapshotError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| SnapshotError::Invalid(format!("CPUID: {e:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
    if let Some(khz) = s.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            // The guest calibrated against this rate; keep it if KVM can scale, else carry on
            // at the host's rate (the guest's clocksource copes through kvmclock).
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::warn!(khz, "cannot set the snapshot's TSC rate: {e}");
            }
        }
    }
    fd.set_mp_state(s.mp_state).map_err(kvm_err("set MP state"))?;
    fd.set_regs(&s.regs).map_err(kvm_err("set registers"))?;
    fd.set_sregs(&s.sregs).map_err(kvm_err("set special registers"))?;
    // SAFETY: `s.xsave` is a whole kvm_xsave (4 KiB legacy layout); KVM reads only that.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm_err("set XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm_err("set XCRs"))?;
    fd.set_debug_regs(&s.debugregs).map_err(kvm_err("set debug registers"))?;
    fd.set_lapic(&s.lapic).map_err(kvm_err("set LAPIC"))?;
    for chunk in s.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let m = msrs(chunk)?;
        let set = fd.set_msrs(&m).map_err(kvm_err("set MSRs"))?;
        if set < chunk.len() {
            return Err(SnapshotError::Invalid(format!(
                "KVM refused MSR {:#x} (this host's CPU differs from the snapshot's)",
                chunk[set].index
            )));
        }
    }
    fd.set_vcpu_events(&s.events).map_err(kvm_err("set vCPU events"))?;
    Ok(())
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    fd.get_irqchip(&mut chip).map_err(kvm_err("get irqchip"))?;
    Ok(chip)
}

pub fn save_vm(fd: &VmFd) -> Result<VmState, SnapshotError> {
    Ok(VmState {
        pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(kvm_err("get PIT"))?,
        clock: fd.get_clock().map_err(kvm_err("get clock"))?,
    })
}

/// Sets the VM-wide state on a VM whose irqchip and PIT exist (before its vCPUs run).
pub fn restore_vm(fd: &VmFd, s: &VmState) -> Result<(), SnapshotError> {
    let chips = [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ];
    for (chip, id) in chips {
        // The id decides which union member KVM reads; a file must not pick another.
        if chip.chip_id != id {
            return Err(SnapshotError::Invalid(format!("irqchip id {} where {id} belongs", chip.chip_id)));
        }
        fd.set_irqchip(chip).map_err(kvm_err("set irqchip"))?;
    }
    fd.set_pit2(&s.pit).map_err(kvm_err("set PIT"))?;
    // Only the clock value is restored; flags that describe the old host's TSC do not apply.
    let clock = kvm_bindings::kvm_clock_data { clock: s.clock.clock, ..Default::default() };
    fd.set_clock(&clock).map_err(kvm_err("set clock"))?;
    Ok(())
}
