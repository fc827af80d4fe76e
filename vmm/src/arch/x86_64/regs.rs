//! Initial vCPU register state for the two entry paths:
//! - PVH: 32-bit protected mode, paging off, `%ebx` = start_info (the PVH ABI);
//! - Linux 64-bit boot protocol: long mode with identity-mapped first GiB, `%rsi` = zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::gdt;
use super::layout::*;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing boot structures to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM vCPU register ioctl: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
}

/// Which entry the kernel image offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH entry of an ELF vmlinux.
    Pvh { entry: u64, start_info: u64 },
    /// 64-bit entry of a bzImage (load address + 0x200).
    Linux64 { entry: u64, zero_page: u64 },
}

fn gdt_for(entry: BootEntry) -> [u64; 4] {
    let code = match entry {
        BootEntry::Pvh { .. } => gdt::CODE32,
        BootEntry::Linux64 { .. } => gdt::CODE64,
    };
    [0, gdt::entry(code, 0, 0xfffff), gdt::entry(gdt::DATA, 0, 0xfffff), gdt::entry(gdt::TSS, 0, 0xfffff)]
}

/// Writes the boot GDT (and an empty IDT) and, for 64-bit boot, identity page tables.
pub fn write_boot_tables<M: GuestMemory>(mem: &M, entry: BootEntry) -> Result<(), RegsError> {
    for (i, e) in gdt_for(entry).iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    if let BootEntry::Linux64 { .. } = entry {
        // PML4[0] -> PDPT, PDPT[0] -> PD, PD maps 512 x 2 MiB pages = the first GiB.
        mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
        mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
        for i in 0..512u64 {
            mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
        }
    }
    Ok(())
}

/// Special registers for `entry`, starting from the vCPU's current ones.
pub fn boot_sregs(mut sregs: kvm_sregs, entry: BootEntry) -> kvm_sregs {
    let table = gdt_for(entry);
    let code = gdt::kvm_segment_from(1, table[1]);
    let data = gdt::kvm_segment_from(2, table[2]);
    let tss = gdt::kvm_segment_from(3, table[3]);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, zero_page } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = zero_page;
        }
    }
    regs
}

/// x87 control word and MXCSR at their architectural reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// Puts the boot vCPU at the kernel entry.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), RegsError> {
    let sregs = boot_sregs(vcpu.get_sregs()?, entry);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&boot_regs(entry))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn pvh_starts_in_flat_protected_mode() {
        let e = BootEntry::Pvh { entry: 0x100_0000, start_info: PVH_INFO_START };
        let s = boot_sregs(kvm_sregs::default(), e);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!((s.cs.l, s.cs.db, s.cs.base, s.cs.limit), (0, 1, 0, 0xffff_ffff));
        assert_eq!(s.efer, 0);
        let r = boot_regs(e);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0000, PVH_INFO_START, 2));
    }

    #[test]
    fn linux64_starts_in_long_mode_with_identity_map() {
        let m = mem();
        let e = BootEntry::Linux64 { entry: 0x10_0200, zero_page: ZERO_PAGE_START };
        write_boot_tables(&m, e).unwrap();
        let s = boot_sregs(kvm_sregs::default(), e);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cr3, s.cs.l, s.cs.db), (PML4_START, 1, 0));
        assert_eq!(m.read_obj::<u64>(GuestAddress(PML4_START)).unwrap(), PDPTE_START | 3);
        assert_eq!(m.read_obj::<u64>(GuestAddress(PDE_START + 511 * 8)).unwrap(), (511 << 21) | 0x83);
        let gdt1: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, gdt::entry(gdt::CODE64, 0, 0xfffff));
        assert_eq!(boot_regs(e).rsi, ZERO_PAGE_START);
    }
}
