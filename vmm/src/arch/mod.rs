//! Architecture support. husk targets x86_64 only for now.

pub mod x86_64;

pub use self::x86_64::*;
