//! Just enough of the i8042 keyboard controller for `reboot=k`: command 0xFE on port 0x64
//! pulses the CPU reset line. There is no keyboard behind it.

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

pub const PORT_BASE: u64 = 0x60;
/// Covers data (0x60) and command/status (0x64).
pub const PORT_LEN: u64 = 5;
const CMD_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

#[derive(Debug)]
pub struct I8042 {
    exit: Arc<ExitNotifier>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; drivers probing see no device.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == CMD_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.notify(ExitReason::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_only() {
        let n = Arc::new(ExitNotifier::new().unwrap());
        let mut d = I8042::new(n.clone());
        d.write(0, &[CMD_RESET_CPU]);
        d.write(CMD_OFFSET, &[0xaa]);
        d.write(CMD_OFFSET, &[]);
        assert_eq!(n.reason(), None);
        let mut b = [1u8; 1];
        d.read(CMD_OFFSET, &mut b);
        assert_eq!(b, [0]);
        d.write(CMD_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(n.reason(), Some(ExitReason::GuestReset));
    }
}
