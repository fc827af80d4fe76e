//! Guest physical address map.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA (left alone)
//! 0x0000_0500  boot GDT, then IDT
//! 0x0000_6000  PVH start_info, then its memory map
//! 0x0000_7000  Linux boot_params (zero page)
//! 0x0000_8ff0  boot stack (bzImage 64-bit entry)
//! 0x0000_9000  identity page tables: PML4, PDPT, PD (first 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  end of low RAM (EBDA above)
//! 0x000e_0000  ACPI tables (RSDP first, where Linux also scans for it)
//! 0x000f_f000  VMGenID: the 16-byte VM generation id
//! 0x0010_0000  high memory: kernel, then initramfs at the top of low RAM
//! 0xc000_0000  MMIO hole: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM beyond 3 GiB continues here
//! ```

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x1000;

/// Low RAM ends where the EBDA would start on a PC.
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x10_0000;
/// The VM generation id, in the last page of the E820-reserved ACPI region so the guest never
/// uses it as RAM; the ACPI tables must end below it.
pub const VMGENID_ADDR: u64 = 0xf_f000;
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit hole for device MMIO: RAM stops at 3 GiB and resumes at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// virtio-mmio device windows, one page each, from here up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM needs three pages for the real-mode TSS on Intel, outside RAM and below 4 GiB.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// Legacy IRQs are ISA-style (edge) GSIs; COM1 uses 4, virtio devices take 5 upwards.
pub const VIRTIO_IRQ_START: u32 = 5;
/// The ACPI Generic Event Device's interrupt (announces a new VM generation); an ISA line
/// nothing else uses (no PIT interrupt is routed there, no COM2).
pub const GED_GSI: u32 = 3;
/// The IOAPIC has 24 pins.
pub const IRQ_MAX: u32 = 23;
