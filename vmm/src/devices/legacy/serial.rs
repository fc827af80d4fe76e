//! COM1: vm-superio's 16550 model, interrupting through an irqfd, with host input fed into
//! its FIFO by the event loop.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::BusDevice;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const PORT_LEN: u64 = 8;

/// Raises the serial IRQ by signalling the irqfd registered for it.
#[derive(Debug)]
pub struct IrqEventFd(pub EventFd);

impl Trigger for IrqEventFd {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the event loop the guest drained the input FIFO, so it may read host input again.
#[derive(Debug)]
pub struct InputDrained(pub Arc<EventFd>);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// Where console bytes go. A broken pipe must not take the VM down, so write errors are dropped.
#[derive(Debug)]
pub enum SerialOutput {
    Stdout,
    File(std::fs::File),
    Sink,
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = match self {
            SerialOutput::Stdout => io::stdout().lock().write(buf),
            SerialOutput::File(f) => f.write(buf),
            SerialOutput::Sink => Ok(buf.len()),
        };
        Ok(r.unwrap_or(buf.len()))
    }
    fn flush(&mut self) -> io::Result<()> {
        if let SerialOutput::Stdout = self {
            let _ = io::stdout().lock().flush();
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct SerialConsole {
    serial: Serial<IrqEventFd, InputDrained, SerialOutput>,
    drained: Arc<EventFd>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: SerialOutput) -> io::Result<Self> {
        let drained = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let serial = Serial::with_events(IrqEventFd(irq), InputDrained(drained.clone()), out);
        Ok(Self { serial, drained })
    }

    /// Signalled whenever the guest empties the receive FIFO.
    pub fn drained_evt(&self) -> Arc<EventFd> {
        self.drained.clone()
    }

    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Registers and FIFO, for a snapshot.
    pub fn save(&self) -> crate::snapshot::state::SerialSnap {
        let s = self.serial.state();
        crate::snapshot::state::SerialSnap {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A console in a saved state; an overfull FIFO is refused.
    pub fn restore(
        irq: EventFd,
        out: SerialOutput,
        s: &crate::snapshot::state::SerialSnap,
    ) -> io::Result<Self> {
        let drained = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, IrqEventFd(irq), InputDrained(drained.clone()), out)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("serial state: {e:?}")))?;
        Ok(Self { serial, drained })
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= PORT_LEN {
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= PORT_LEN {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            tracing::debug!("serial write: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_sizes_are_ignored_and_input_flows() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialConsole::new(irq.try_clone().unwrap(), SerialOutput::Sink).unwrap();
        let mut wide = [0u8; 4];
        s.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        s.write(0, &[1, 2]);
        // Enable the received-data interrupt, then feed input.
        s.write(1, &[1]);
        assert_eq!(s.enqueue_input(b"hi"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8; 1];
        s.read(0, &mut b);
        assert_eq!(b[0], b'h');
        s.read(0, &mut b);
        assert_eq!(b[0], b'i');
        assert_eq!(s.drained_evt().read().unwrap(), 1);
    }
}
