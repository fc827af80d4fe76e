//! Builds the guest initramfs: an uncompressed `newc` cpio archive.
//!
//! The kernel unpacks this format natively, so no compression step or external `cpio` tool is
//! needed and building stays deterministic (fixed mtimes, owners and inode numbers).

pub mod cpio;
pub mod spec;

pub use cpio::{CpioError, CpioWriter};
pub use spec::{build_from_spec, Entry, SpecError};
