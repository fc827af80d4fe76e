//! The few PC devices a Linux guest needs: a 16550 console, a keyboard controller for reset,
//! the ACPI sleep control register for poweroff, and pvpanic for panic reports.

pub mod i8042;
pub mod pvpanic;
pub mod serial;
pub mod sleep_ctl;

pub use i8042::I8042;
pub use pvpanic::PvPanic;
pub use serial::{SerialConsole, SerialOutput};
pub use sleep_ctl::AcpiSleepControl;
