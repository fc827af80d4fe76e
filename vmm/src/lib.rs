//! husk-vmm: a small KVM virtual machine monitor for husk sandboxes.
//!
//! It boots a Linux guest (ELF vmlinux through PVH, or a bzImage) with a serial console, a
//! minimal hardware-reduced ACPI platform and virtio-mmio devices, and reports how the guest
//! ended through [`ExitReason`].

pub mod arch;
pub mod builder;
pub mod config;
pub mod confine;
pub mod devices;
pub mod exit;
pub mod handover;
pub mod jail;
pub mod loopback_forward;
pub mod memory;
pub mod snapshot;
pub mod vmm;
pub mod vstate;

pub use builder::{build_vmm, build_vmm_with, BuildError};
pub use config::VmConfig;
pub use exit::ExitReason;
pub use vmm::Vmm;
