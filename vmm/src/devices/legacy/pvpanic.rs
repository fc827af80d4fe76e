//! pvpanic at the I/O port QEMU uses, described in the DSDT as `QEMU0001` so Linux's
//! pvpanic driver binds to it and writes here from its panic notifier, before any reboot.

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

pub const PORT: u64 = 0x505;
pub const PORT_LEN: u64 = 1;
/// Event bits (the guest reads the supported set, then writes the event).
const PVPANIC_PANICKED: u8 = 1 << 0;

#[derive(Debug)]
pub struct PvPanic {
    exit: Arc<ExitNotifier>,
}

impl PvPanic {
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        Self { exit }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PVPANIC_PANICKED != 0) {
            self.exit.notify(ExitReason::GuestPanic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panicked_bit_reports_panic() {
        let n = Arc::new(ExitNotifier::new().unwrap());
        let mut d = PvPanic::new(n.clone());
        let mut b = [0u8; 1];
        d.read(0, &mut b);
        assert_eq!(b[0], PVPANIC_PANICKED);
        d.write(0, &[2]); // crash-loaded only
        assert_eq!(n.reason(), None);
        d.write(0, &[1]);
        assert_eq!(n.reason(), Some(ExitReason::GuestPanic));
    }
}
