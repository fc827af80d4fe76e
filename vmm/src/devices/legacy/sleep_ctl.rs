//! The hardware-reduced ACPI sleep control register (ACPI 6.x, 4.8.3.7). Linux writes
//! `SLP_TYPx << 2 | SLP_EN` here to enter a sleep state; S5 (as our DSDT's `\_S5` says) is
//! poweroff.

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

pub const PORT: u64 = 0x3c0;
/// Control register then status register, one byte each.
pub const PORT_LEN: u64 = 2;
/// The `SLP_TYPx` value the DSDT's `\_S5` package advertises.
pub const S5_SLEEP_TYPE: u8 = 5;
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

#[derive(Debug)]
pub struct AcpiSleepControl {
    exit: Arc<ExitNotifier>,
}

impl AcpiSleepControl {
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiSleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 && v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE {
            self.exit.notify(ExitReason::PowerOff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_enable_powers_off() {
        let n = Arc::new(ExitNotifier::new().unwrap());
        let mut d = AcpiSleepControl::new(n.clone());
        d.write(0, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        d.write(0, &[(3 << 2) | SLP_EN]); // S3
        d.write(1, &[(S5_SLEEP_TYPE << 2) | SLP_EN]); // status register
        d.write(0, &[]);
        assert_eq!(n.reason(), None);
        d.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(n.reason(), Some(ExitReason::PowerOff));
    }
}
