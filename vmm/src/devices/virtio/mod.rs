//! virtio 1.2 devices over the MMIO transport (spec section 4.2).
//!
//! Every value the guest writes (register values, queue addresses, descriptor chains) is
//! untrusted: the transport enforces the status state machine, and devices validate every
//! chain and cap the work one request can cause.

pub mod device;
pub mod fs;
pub mod interrupt;
pub mod log_limit;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

pub use device::{ActivateContext, ActivateError, VirtioDevice};
pub use interrupt::VirtioInterrupt;
pub use mmio::MmioTransport;

/// Feature bit every modern device offers and the driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device IDs (spec 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;
