//! The MMIO transport's interrupt: a status word the driver reads and acknowledges, and an
//! irqfd that raises the device's GSI without a trip through the VMM.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

pub const INT_VRING: u32 = 1 << 0;
pub const INT_CONFIG: u32 = 1 << 1;

#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irqfd }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio irqfd write failed: {e}");
        }
    }

    pub fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }

    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Sets a restored status; pending bits are raised again so the driver looks at them
    /// (a spurious look finds nothing and costs nothing).
    pub fn restore(&self, status: u32) {
        self.status.store(0, Ordering::SeqCst);
        if status != 0 {
            self.raise(status);
        }
    }
}
