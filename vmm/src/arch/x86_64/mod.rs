//! x86_64 guest setup: memory layout, boot protocols (PVH and the Linux boot protocol), ACPI
//! tables, and vCPU state (CPUID, MSRs, registers, LAPIC).

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod msr;
pub mod regs;
