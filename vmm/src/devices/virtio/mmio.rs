//! The virtio-mmio transport, version 2 (spec 4.2.2): registers, the device status state
//! machine and queue configuration. Guest writes that break the protocol are ignored (logged at
//! debug level); they never panic or reach the device.

use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::{INT_CONFIG, INT_VRING};
use super::{ActivateContext, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;
use crate::memory::GuestMem;
use crate::snapshot::state::{DeviceIdentity, QueueSnap, TransportState};
use crate::snapshot::SnapshotError;

/// One 4 KiB page of register space per device.
pub const MMIO_LEN: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b53_5548; // "HUSK"

// Register offsets.
pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_SHM_SEL: u64 = 0x0ac;
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG_SPACE: u64 = 0x100;

// Device status bits (spec 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    interrupt: Arc<VirtioInterrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// `queue_evts` must hold one eventfd per queue; the caller registers them as ioeventfds on
    /// this device's QueueNotify register.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues =
            device.queue_max_sizes().iter().map(|&max| Queue::new(max)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
        })
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK, on a queue that is not
    /// yet live (spec 4.2.3.2).
    fn queue_config_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn features_write_allowed(&self) -> bool {
        self.status & (STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_FAILED) == STATUS_DRIVER
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.clear();
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        if new & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        // The driver may only add bits, one step at a time, in the order the spec gives.
        let added = new & !self.status;
        if new & self.status != self.status || added.count_ones() != 1 {
            tracing::debug!(old = self.status, new, "virtio-mmio: invalid status transition");
            return;
        }
        let ok = match added {
            STATUS_ACKNOWLEDGE => self.status == 0,
            STATUS_DRIVER => self.status == STATUS_ACKNOWLEDGE,
            STATUS_FEATURES_OK => {
                self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER
                    && self.acked_features & VIRTIO_F_VERSION_1 != 0
            }
            STATUS_DRIVER_OK => self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
            _ => false,
        };
        if !ok {
            // A refused FEATURES_OK stays clear, which is how the driver learns of the refusal.
            tracing::debug!(old = self.status, new, "virtio-mmio: status step refused");
            return;
        }
        self.status = new;
        if added == STATUS_DRIVER_OK {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let ready: Vec<usize> = (0..self.queues.len()).filter(|&i| self.queues[i].ready()).collect();
        let all_valid = ready.len() == self.queues.len() && self.queues.iter().all(|q| q.is_valid(&self.mem));
        let evts: Result<Vec<EventFd>, _> = self.queue_evts.iter().map(EventFd::try_clone).collect();
        let result = match (all_valid, evts) {
            (true, Ok(queue_evts)) => self.device.activate(ActivateContext {
                mem: self.mem.clone(),
                queues: self.queues.iter().filter_map(|q| Queue::try_from(q.state()).ok()).collect(),
                queue_evts,
                interrupt: self.interrupt.clone(),
                acked_features: self.acked_features,
            }),
            (false, _) => {
                Err(super::ActivateError::QueueCount { needed: self.queues.len(), ready: ready.len() })
            }
            (_, Err(e)) => Err(super::ActivateError::Worker(e)),
        };
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::warn!(device = self.device.device_type(), "virtio activation failed: {e}");
                self.status |= STATUS_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size() as u32),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready() as u32),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: length all ones means "absent" (spec 4.2.2).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(offset, "virtio-mmio: read of unknown or write-only register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if self.features_write_allowed() => {
                // Accept only what we offered; the driver sees the result through FEATURES_OK.
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                let offered = self.device.avail_features() & mask;
                let wanted = ((v as u64) << shift) & mask;
                if wanted & !offered != 0 {
                    tracing::debug!(wanted, offered, "virtio-mmio: driver acked unoffered features");
                }
                self.acked_features = (self.acked_features & !mask) | (wanted & offered);
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    // Rejects zero, non-powers of two and sizes above the maximum.
                    if q.try_set_size(v.try_into().unwrap_or(0)).is_err() {
                        tracing::debug!(size = v, "virtio-mmio: bad queue size");
                    }
                }
            }
            REG_QUEUE_READY if self.queue_config_allowed() => {
                let mem = self.mem.clone();
                if let Some(q) = self.selected_queue() {
                    match v {
                        0 => q.set_ready(false),
                        1 => {
                            q.set_ready(true);
                            if !q.is_valid(&mem) {
                                tracing::debug!("virtio-mmio: queue layout outside guest memory");
                                q.set_ready(false);
                            }
                        }
                        _ => {}
                    }
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if self.queue_config_allowed() =>
            {
                let Some(q) = self.selected_queue().filter(|q| !q.ready()) else { return };
                let (lo, hi) = if offset & 4 == 0 { (Some(v), None) } else { (None, Some(v)) };
                match offset & !4 {
                    REG_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                    REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            // Notifies normally go to the ioeventfd; a write that reaches us (before the
            // ioeventfd exists, or in tests) is forwarded the same way.
            REG_QUEUE_NOTIFY => {
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            REG_SHM_SEL => {}
            _ => tracing::debug!(offset, v, status = self.status, "virtio-mmio: ignored register write"),
        }
    }
}

/// Status bits a saved transport may hold.
const KNOWN_STATUS: u32 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_DRIVER_OK
    | STATUS_FEATURES_OK
    | STATUS_NEEDS_RESET
    | STATUS_FAILED;
const LIVE_STATUS: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

fn queue_snap(q: &Queue) -> QueueSnap {
    let s = q.state();
    QueueSnap {
        max_size: s.max_size,
        size: s.size,
        ready: s.ready,
        desc_table: s.desc_table,
        avail_ring: s.avail_ring,
        used_ring: s.used_ring,
        next_avail: s.next_avail,
        next_used: s.next_used,
        event_idx: s.event_idx_enabled,
    }
}

/// What the guest's driver learns about a device at probe; a restore needs the same.
pub fn device_identity(device: &dyn VirtioDevice) -> DeviceIdentity {
    let mut config = vec![0u8; 256];
    device.read_config(0, &mut config);
    DeviceIdentity {
        device_type: device.device_type(),
        features: device.avail_features(),
        queue_max_sizes: device.queue_max_sizes().to_vec(),
        config,
    }
}

impl MmioTransport {
    pub fn identity(&self) -> DeviceIdentity {
        device_identity(self.device.as_ref())
    }

    /// Whether the device can be snapshotted now (see [`VirtioDevice::snapshot_ready`]).
    pub fn snapshot_ready(&self) -> Result<(), String> {
        self.device.snapshot_ready()
    }

    /// Stops the device and returns the transport's state. Every device completes each chain
    /// it takes before it looks at its queue events again, so once the worker has stopped no
    /// chain is in flight and the used index the device last published in guest memory is
    /// both the next used and the next available position. Call [`Self::resume_after_save`]
    /// if the snapshot is abandoned.
    pub fn save(&mut self) -> TransportState {
        if self.activated {
            self.device.reset();
            for q in self.queues.iter_mut().filter(|q| q.ready()) {
                let idx = self.mem.read_obj::<u16>(GuestAddress(q.used_ring()).unchecked_add(2)).unwrap_or(0);
                q.set_next_used(idx);
                q.set_next_avail(idx);
            }
        }
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues: self.queues.iter().map(queue_snap).collect(),
        }
    }

    /// Restarts a device that [`Self::save`] stopped, from where it stopped.
    pub fn resume_after_save(&mut self) {
        if self.activated {
            self.activated = false;
            self.activate();
            self.kick_queues();
        }
    }

    /// A notify the driver sent before the snapshot may not have been served: look at every
    /// queue once (an empty look costs nothing).
    fn kick_queues(&self) {
        for evt in &self.queue_evts {
            let _ = evt.write(1);
        }
    }

    /// Builds a transport from saved state, which is checked like guest input: it must fit the
    /// device (queue count and sizes, offered features) and guest memory (queue rings), and be
    /// a state the transport itself could have reached. An activated device is started.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
        queue_evts: Vec<EventFd>,
        state: &TransportState,
    ) -> Result<Self, SnapshotError> {
        let bad =
            |what: String| Err(SnapshotError::Invalid(format!("device type {}: {what}", state.device_type)));
        if state.device_type != device.device_type() {
            return bad(format!(
                "saved for device type {}, found {}",
                state.device_type,
                device.device_type()
            ));
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return bad(format!("{} queues saved, device has {}", state.queues.len(), max_sizes.len()));
        }
        if state.acked_features & !device.avail_features() != 0 {
            return bad(format!(
                "acked features {:#x} not all offered ({:#x})",
                state.acked_features,
                device.avail_features()
            ));
        }
        if state.status & !KNOWN_STATUS != 0 {
            return bad(format!("unknown status bits {:#x}", state.status));
        }
        if state.activated
            && (state.status & (LIVE_STATUS | STATUS_NEEDS_RESET | STATUS_FAILED) != LIVE_STATUS
                || state.acked_features & VIRTIO_F_VERSION_1 == 0)
        {
            return bad(format!("activated with status {:#x}", state.status));
        }
        if state.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return bad(format!("unknown interrupt bits {:#x}", state.interrupt_status));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (i, (q, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            let qbad = |what: &str| bad(format!("queue {i}: {what}"));
            if q.max_size != max {
                return qbad(&format!("max size {} is not the device's {max}", q.max_size));
            }
            if q.next_avail.wrapping_sub(q.next_used) > q.size {
                return qbad(&format!(
                    "{} chains in flight in a queue of {}",
                    q.next_avail.wrapping_sub(q.next_used),
                    q.size
                ));
            }
            let vq = Queue::try_from(QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            });
            let vq = match vq {
                Ok(vq) => vq,
                Err(e) => return qbad(&format!("{e}")),
            };
            if q.ready && !vq.is_valid(&mem) {
                return qbad("rings outside guest memory");
            }
            if state.activated && !q.ready {
                return qbad("not ready on an activated device");
            }
            queues.push(vq);
        }
        if queue_evts.len() != queues.len() {
            return bad("queue eventfd count".into());
        }
        interrupt.restore(state.interrupt_status);
        let mut t = Self {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            acked_features: state.acked_features,
            queue_sel: state.queue_sel,
            config_generation: state.config_generation,
            activated: false,
        };
        if state.activated {
            t.activate();
            if !t.activated {
                return bad("the device did not start".into());
            }
            t.kick_queues();
        }
        Ok(t)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32-bit and must be accessed as such (spec 4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            // Config writes are only meaningful while the driver is setting the device up.
            if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FAILED == 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else { return };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::devices::virtio::device::read_config_bytes;
    use crate::devices::virtio::ActivateError;

    struct Dummy {
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 32]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4], offset, data)
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            assert_eq!(ctx.queues.len(), 2);
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Harness {
        t: MmioTransport,
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
    }

    fn harness() -> Harness {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let activations = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let dev = Dummy { activations: activations.clone(), resets: resets.clone() };
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let evts = vec![EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap()];
        let t = MmioTransport::new(Box::new(dev), mem, irq, evts).unwrap();
        Harness { t, activations, resets }
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, 0b111); // bit 1 was not offered
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, 1);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, idx: u32, size: u32, base: u64) {
        w(t, REG_QUEUE_SEL, idx);
        w(t, REG_QUEUE_NUM, size);
        w(t, REG_QUEUE_DESC_LOW, base as u32);
        w(t, REG_QUEUE_DESC_HIGH, 0);
        w(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, REG_QUEUE_READY, 1);
    }

    #[test]
    fn identity_registers() {
        let mut h = harness();
        assert_eq!(r(&mut h.t, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut h.t, REG_VERSION), 2);
        assert_eq!(r(&mut h.t, REG_DEVICE_ID), 42);
        w(&mut h.t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut h.t, REG_DEVICE_FEATURES), 1);
        w(&mut h.t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut h.t, REG_DEVICE_FEATURES), 0b101);
        w(&mut h.t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut h.t, REG_DEVICE_FEATURES), 0);
        w(&mut h.t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut h.t, REG_QUEUE_NUM_MAX), 32);
        w(&mut h.t, REG_QUEUE_SEL, 9);
        assert_eq!(r(&mut h.t, REG_QUEUE_NUM_MAX), 0);
        let mut b = [0u8; 2];
        h.t.read(CONFIG_SPACE + 2, &mut b);
        assert_eq!(b, [3, 4]);
        h.t.read(CONFIG_SPACE + 3, &mut b);
        assert_eq!(b, [4, 0]);
        h.t.read(u64::MAX - 1, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn feature_negotiation_masks_unoffered_bits() {
        let mut h = harness();
        negotiate(&mut h.t);
        assert_eq!(h.t.acked_features(), VIRTIO_F_VERSION_1 | 0b101);
        assert_ne!(h.t.status() & STATUS_FEATURES_OK, 0);
        // Features are frozen after FEATURES_OK.
        w(&mut h.t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut h.t, REG_DRIVER_FEATURES, 0);
        assert_eq!(h.t.acked_features(), VIRTIO_F_VERSION_1 | 0b101);
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let mut h = harness();
        w(&mut h.t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(&mut h.t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut h.t, REG_DRIVER_FEATURES, 1);
        w(&mut h.t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_eq!(r(&mut h.t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn status_steps_must_be_in_order() {
        let mut h = harness();
        w(&mut h.t, REG_STATUS, STATUS_DRIVER_OK);
        assert_eq!(h.t.status(), 0);
        w(&mut h.t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(h.t.status(), 0);
        w(&mut h.t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(&mut h.t, REG_STATUS, 0xffff_ff7f);
        assert_eq!(h.t.status(), STATUS_ACKNOWLEDGE);
        // Clearing bits is not allowed except by reset.
        w(&mut h.t, REG_STATUS, STATUS_DRIVER);
        assert_eq!(h.t.status(), STATUS_ACKNOWLEDGE);
    }

    #[test]
    fn queue_setup_activate_and_reset() {
        let mut h = harness();
        // Queue registers are ignored before FEATURES_OK.
        w(&mut h.t, REG_QUEUE_NUM, 8);
        negotiate(&mut h.t);
        setup_queue(&mut h.t, 0, 16, 0x10000);
        setup_queue(&mut h.t, 1, 32, 0x20000);
        w(&mut h.t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut h.t, REG_QUEUE_READY), 1);
        w(&mut h.t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(h.t.is_activated());
        assert_eq!(h.activations.load(Ordering::SeqCst), 1);
        // Live queues cannot be reconfigured.
        w(&mut h.t, REG_QUEUE_READY, 0);
        assert_eq!(r(&mut h.t, REG_QUEUE_READY), 1);
        w(&mut h.t, REG_STATUS, 0);
        assert_eq!(h.resets.load(Ordering::SeqCst), 1);
        assert_eq!(h.t.status(), 0);
        assert_eq!(r(&mut h.t, REG_QUEUE_READY), 0);
        assert_eq!(h.t.acked_features(), 0);
        // And it can be brought up again.
        negotiate(&mut h.t);
        setup_queue(&mut h.t, 0, 16, 0x10000);
        setup_queue(&mut h.t, 1, 32, 0x20000);
        w(&mut h.t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(h.activations.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn hostile_queue_values_never_activate() {
        let mut h = harness();
        negotiate(&mut h.t);
        // Not a power of two, too large, zero.
        for size in [3, 64, 0, 0x1_0010] {
            w(&mut h.t, REG_QUEUE_SEL, 0);
            w(&mut h.t, REG_QUEUE_NUM, size);
        }
        // Rings beyond guest memory: ready is refused.
        setup_queue(&mut h.t, 0, 16, 0xffff_f000);
        assert_eq!(r(&mut h.t, REG_QUEUE_READY), 0);
        w(&mut h.t, REG_QUEUE_DESC_HIGH, 0xffff_ffff);
        w(&mut h.t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut h.t, REG_QUEUE_READY), 0);
        // A misaligned descriptor table address is refused; the queue keeps its old one.
        w(&mut h.t, REG_QUEUE_SEL, 1);
        w(&mut h.t, REG_QUEUE_DESC_LOW, 0x20001);
        assert_ne!(h.t.queues[1].desc_table(), 0x20001);
        // DRIVER_OK with queues not ready: device asks for reset instead of activating.
        w(&mut h.t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(h.activations.load(Ordering::SeqCst), 0);
        assert_ne!(h.t.status() & STATUS_NEEDS_RESET, 0);
        assert_ne!(r(&mut h.t, REG_INTERRUPT_STATUS) & super::super::interrupt::INT_CONFIG, 0);
    }

    /// A live transport with both queues used a little, saved.
    fn saved_live() -> (Harness, TransportState) {
        let mut h = harness();
        negotiate(&mut h.t);
        setup_queue(&mut h.t, 0, 16, 0x10000);
        setup_queue(&mut h.t, 1, 32, 0x20000);
        w(&mut h.t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(h.t.is_activated());
        // The device published used index 7 on queue 1.
        h.t.mem.write_obj(7u16, GuestAddress(0x22002)).unwrap();
        let state = h.t.save();
        (h, state)
    }

    fn restore_into(state: &TransportState) -> Result<(MmioTransport, Arc<AtomicUsize>), SnapshotError> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let activations = Arc::new(AtomicUsize::new(0));
        let dev = Dummy { activations: activations.clone(), resets: Arc::new(AtomicUsize::new(0)) };
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let evts = vec![EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap()];
        MmioTransport::restore(Box::new(dev), mem, irq, evts, state).map(|t| (t, activations))
    }

    #[test]
    fn save_and_restore_round_trip() {
        let (h, state) = saved_live();
        // Saving stopped the device; the queues resume where the device left them.
        assert_eq!(h.resets.load(Ordering::SeqCst), 1);
        assert_eq!((state.queues[1].next_avail, state.queues[1].next_used), (7, 7));
        assert_eq!((state.queues[0].next_avail, state.queues[0].next_used), (0, 0));
        let json = serde_json::to_string(&state).unwrap();
        let back: TransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let (mut t, activations) = restore_into(&back).unwrap();
        assert!(t.is_activated());
        assert_eq!(activations.load(Ordering::SeqCst), 1);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1 | 0b101);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        assert_eq!(t.queues[1].next_avail(), 7);
        // A fresh (never driven) transport restores as such.
        let fresh = harness().t.save();
        let (t, activations) = restore_into(&fresh).unwrap();
        assert!(!t.is_activated() && activations.load(Ordering::SeqCst) == 0);
    }

    #[test]
    fn abandoned_save_resumes_the_device() {
        let (mut h, _) = saved_live();
        h.t.resume_after_save();
        assert!(h.t.is_activated());
        assert_eq!(h.activations.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn hostile_saved_state_is_refused() {
        let (_, good) = saved_live();
        type Change = Box<dyn Fn(&mut TransportState)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.device_type = 1), "saved for device type"),
            (Box::new(|s| s.queues.truncate(1)), "1 queues saved, device has 2"),
            (Box::new(|s| s.acked_features |= 0b10), "not all offered"),
            (Box::new(|s| s.status |= 0x100), "unknown status bits"),
            (Box::new(|s| s.status = STATUS_ACKNOWLEDGE), "activated with status"),
            (Box::new(|s| s.acked_features &= !VIRTIO_F_VERSION_1), "activated with status"),
            (Box::new(|s| s.interrupt_status = 4), "unknown interrupt bits"),
            (Box::new(|s| s.queues[0].max_size = 256), "max size 256"),
            (Box::new(|s| s.queues[0].size = 3), "queue 0"),
            (Box::new(|s| s.queues[0].size = 64), "queue 0"),
            (Box::new(|s| s.queues[0].size = 0), "queue 0"),
            (Box::new(|s| s.queues[1].desc_table = 0xffff_0000), "outside guest memory"),
            (Box::new(|s| s.queues[1].used_ring = u64::MAX - 1), "queue 1"),
            (Box::new(|s| s.queues[1].desc_table = 0x20001), "queue 1"),
            (Box::new(|s| s.queues[1].avail_ring = 0x10_0000 - 2), "outside guest memory"),
            (Box::new(|s| s.queues[0].ready = false), "not ready on an activated device"),
            (Box::new(|s| s.queues[1].next_avail = s.queues[1].next_used.wrapping_add(33)), "in flight"),
            (Box::new(|s| s.queues[1].next_used = s.queues[1].next_avail.wrapping_add(1)), "in flight"),
        ];
        for (change, needle) in cases {
            let mut s = good.clone();
            change(&mut s);
            match restore_into(&s) {
                Err(SnapshotError::Invalid(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
                Err(e) => panic!("{needle}: unexpected error {e}"),
                Ok(_) => panic!("{needle}: hostile state accepted"),
            }
        }
    }

    #[test]
    fn bad_offsets_and_sizes_are_harmless() {
        let mut h = harness();
        let mut odd = [0u8; 3];
        for off in [0u64, 1, 2, 3, 0x51, 0xfff, 0x1000, u64::MAX] {
            h.t.read(off, &mut odd);
            h.t.write(off, &odd);
        }
        for off in (0..0x100).step_by(4) {
            let _ = r(&mut h.t, off);
            w(&mut h.t, off, 0xffff_ffff);
        }
        let mut one = [0u8; 1];
        h.t.read(REG_MAGIC, &mut one);
        assert_eq!(one, [0]);
        // Notify for a queue that does not exist.
        w(&mut h.t, REG_QUEUE_NOTIFY, 1000);
        assert_eq!(h.activations.load(Ordering::SeqCst), 0);
    }
}
