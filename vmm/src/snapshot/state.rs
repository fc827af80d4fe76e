//! What a snapshot holds, as plain serde types. KVM structs are kept whole (kvm-bindings
//! serialises them as their bytes); everything else is named fields, so the state file is
//! self-describing JSON behind the binary header of [`super::file`].

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

/// The shape a snapshot can only be restored into. Compared field by field at restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub memory_mib: u64,
    pub vcpus: u32,
    /// The caller's name for the kernel, initramfs and command line (`--image-id`), if given.
    pub image_id: Option<String>,
    /// Sizes of the images the VM booted from: a cheap guard when no image id is given.
    pub kernel_len: u64,
    pub initramfs_len: Option<u64>,
    pub serial: bool,
    /// virtio devices in placement order (which fixes their MMIO windows and interrupts).
    pub devices: Vec<DeviceIdentity>,
}

/// What the guest driver learnt about a device at probe: its type, offered features, queues
/// and config space (MAC, vsock CID, fs tag...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    pub device_type: u32,
    pub features: u64,
    pub queue_max_sizes: Vec<u16>,
    pub config: Vec<u8>,
}

/// VM-wide KVM state: the in-kernel PIC pair and IOAPIC, the PIT and kvmclock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// The TSC rate the guest calibrated against; None where KVM cannot tell.
    pub tsc_khz: Option<u32>,
}

/// One virtqueue as the transport and device left it (virtio-queue's `QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnap {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

/// A virtio-mmio transport: registers, negotiated features and its queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    pub queues: Vec<QueueSnap>,
}

/// The 16550's registers and receive FIFO (vm-superio's `SerialState`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnap {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// One guest RAM range and where it sits in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemRegion {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// The whole state file payload.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub identity: Identity,
    pub memory: Vec<MemRegion>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: Vec<TransportState>,
    pub serial: Option<SerialSnap>,
    /// The VM generation id device (format version 2 on).
    pub vmgenid: crate::devices::vmgenid::VmGenIdState,
}
