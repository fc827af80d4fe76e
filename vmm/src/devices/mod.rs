//! Devices the guest sees: the I/O buses, legacy PC devices and virtio over MMIO.

pub mod bus;
pub mod legacy;
pub mod virtio;
pub mod vmgenid;

pub use bus::{Bus, BusDevice, BusError};
