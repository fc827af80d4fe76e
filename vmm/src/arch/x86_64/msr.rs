//! Model-specific registers every vCPU starts with.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs on, default type write-back: guest RAM must not be treated as uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    #[error("building the MSR list: {0}")]
    Fam(#[from] vmm_sys_util::fam::Error),
    #[error("KVM_SET_MSRS: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    #[error("KVM accepted only {set} of {total} boot MSRs")]
    Partial { set: usize, total: usize },
}

pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries)?;
    let set = vcpu.set_msrs(&msrs)?;
    if set != entries.len() {
        return Err(MsrError::Partial { set, total: entries.len() });
    }
    Ok(())
}
