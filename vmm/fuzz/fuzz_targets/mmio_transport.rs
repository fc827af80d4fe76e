//! The virtio-mmio transport from a hostile guest: the input is a preamble (which device sits
//! behind the transport: a dummy with 1-3 queues of fuzzer-chosen maximum sizes, offered
//! features and config space) and a script of register reads and writes at any
//! offset with any access size (1/2/4/8 bytes, sometimes another length), well-behaved driver
//! steps (the status handshake, feature words, a queue laid out inside guest RAM) that the raw
//! accesses can interleave with and break, queue notifications, writes anywhere in guest RAM,
//! and device passes (virtio-rng's `process_queue`) over the queues the device was activated
//! with. A dummy rather than a real device: the devices' activate starts a worker thread,
//! which would make iterations depend on thread timing; the dummy hands the activated queues
//! to the harness instead, and the device pass serves them in the fuzzing thread.
//!
//! Guest RAM is small and has a hole (64 KiB at 0, 64 KiB at 128 KiB), so queue addresses can
//! land in RAM, in the hole, across a region's end or beyond everything.
//!
//! Checked on every step: the transport never panics; the device is activated only from
//! DRIVER_OK, with every queue ready, of a valid size and inside guest RAM, with only offered
//! features (VERSION_1 among them), and never twice without a reset in between; reset reaches the
//! device only after an activation; the status register holds only the bits the spec defines;
//! a status write of 0 clears status, features and queue readiness.

#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use husk_vmm::devices::virtio::device::read_config_bytes;
use husk_vmm::devices::virtio::mmio::{
    MmioTransport, CONFIG_SPACE, MMIO_LEN, REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL, REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL, REG_INTERRUPT_ACK, REG_INTERRUPT_STATUS, REG_MAGIC, REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DESC_LOW, REG_QUEUE_DEVICE_HIGH, REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DRIVER_LOW, REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_NUM_MAX, REG_QUEUE_READY, REG_QUEUE_SEL,
    REG_STATUS, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
};
use husk_vmm::devices::virtio::rng;
use husk_vmm::devices::virtio::{
    ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use husk_vmm::devices::BusDevice;
use husk_vmm_fuzz::Input;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Mem = GuestMemoryMmap<()>;

/// Every register the transport knows, plus neighbours it does not (the fuzzer picks by index).
const REGS: [u64; 28] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x03c, 0x040, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0ac, 0x0b0, 0x0b4, 0x0fc,
];

const ALL_STATUS: u32 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_DRIVER_OK
    | STATUS_FEATURES_OK
    | STATUS_NEEDS_RESET
    | STATUS_FAILED;

/// Guest RAM: two 64 KiB regions with a 64 KiB hole between them.
const RAM: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];
const MAX_COMMANDS: usize = 128;
const MAX_SIZES: [u16; 8] = [1, 2, 4, 16, 64, 256, 1024, 32768];

/// What the dummy device saw; shared with the harness, which outlives no iteration.
#[derive(Default)]
struct Seen {
    activations: AtomicUsize,
    resets: AtomicUsize,
    /// The queues of the live activation, for device passes.
    queues: Mutex<Vec<Queue>>,
}

struct Dummy {
    max_sizes: Vec<u16>,
    features: u64,
    config: Vec<u8>,
    mem: Mem,
    seen: Arc<Seen>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn avail_features(&self) -> u64 {
        self.features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else { return };
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = start.checked_add(i).and_then(|j| self.config.get_mut(j)) {
                *slot = *b;
            }
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let live = self.seen.activations.load(Ordering::SeqCst) - self.seen.resets.load(Ordering::SeqCst);
        assert_eq!(live, 0, "activated twice without a reset");
        assert_eq!(ctx.queues.len(), self.max_sizes.len(), "activation without every queue");
        assert_eq!(ctx.queue_evts.len(), self.max_sizes.len());
        assert_eq!(ctx.acked_features & !self.features, 0, "unoffered features acked");
        assert_ne!(ctx.acked_features & VIRTIO_F_VERSION_1, 0, "activation without VERSION_1");
        for (q, &max) in ctx.queues.iter().zip(&self.max_sizes) {
            assert!(q.ready(), "activation with a queue not ready");
            assert!(q.is_valid(&self.mem), "activation with a queue outside guest RAM: {q:?}");
            assert!(q.size().is_power_of_two() && q.size() <= max, "queue size {} (max {max})", q.size());
        }
        self.seen.activations.fetch_add(1, Ordering::SeqCst);
        *self.seen.queues.lock().unwrap() = ctx.queues;
        Ok(())
    }
    fn reset(&mut self) {
        let live = self.seen.activations.load(Ordering::SeqCst) - self.seen.resets.load(Ordering::SeqCst);
        assert_eq!(live, 1, "reset reached the device without a live activation");
        self.seen.resets.fetch_add(1, Ordering::SeqCst);
        self.seen.queues.lock().unwrap().clear();
    }
}

struct Run {
    t: MmioTransport,
    mem: Mem,
    seen: Arc<Seen>,
    num_queues: u32,
}

impl Run {
    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn r32(&mut self, offset: u64) -> u32 {
        self.read(offset, 4) as u32
    }

    fn w32(&mut self, offset: u64, v: u32) {
        self.t.write(offset, &v.to_le_bytes());
        self.check();
    }

    fn check(&mut self) {
        let status = self.t.status();
        assert_eq!(status & !ALL_STATUS, 0, "status {status:#x} has undefined bits");
        assert_eq!(self.r32(REG_STATUS), status);
        assert_eq!(self.r32(REG_MAGIC), 0x7472_6976);
        assert_eq!(self.r32(REG_INTERRUPT_STATUS) & !3, 0);
        let live = self.seen.activations.load(Ordering::SeqCst) - self.seen.resets.load(Ordering::SeqCst);
        assert_eq!(live == 1, self.t.is_activated());
        if self.t.is_activated() {
            assert_ne!(status & STATUS_DRIVER_OK, 0);
        }
    }

    fn offset(inp: &mut Input<'_>) -> u64 {
        match inp.u8() {
            0..=0x9f => {
                let r = REGS[inp.u8() as usize % REGS.len()];
                // Sometimes one to three bytes into the register.
                if inp.u8() & 7 == 0 {
                    r + u64::from(inp.u8() % 4)
                } else {
                    r
                }
            }
            0xa0..=0xdf => CONFIG_SPACE + u64::from(inp.u8()),
            0xe0..=0xf7 => u64::from(inp.u16()) % MMIO_LEN,
            _ => inp.u64(),
        }
    }

    fn len(inp: &mut Input<'_>) -> usize {
        match inp.u8() % 8 {
            0..=3 => 4,
            4 => 1,
            5 => 2,
            6 => 8,
            _ => inp.u8() as usize % 9,
        }
    }

    /// A queue address: inside one of the RAM regions, in the hole, near a region's end, or raw.
    fn addr(inp: &mut Input<'_>) -> u64 {
        match inp.u8() % 8 {
            0..=3 => u64::from(inp.u16()) & !0xf,
            4 => 0x2_0000 + (u64::from(inp.u16()) & !0xf),
            5 => 0x1_0000 - u64::from(inp.u8()) * 16,
            6 => 0x3_0000 - u64::from(inp.u8()) * 16,
            _ => inp.u64(),
        }
    }

    fn setup_queue(&mut self, inp: &mut Input<'_>) {
        let idx = match inp.u8() {
            0..=0xef => u32::from(inp.u8()) % self.num_queues.max(1),
            _ => inp.u32(),
        };
        self.w32(REG_QUEUE_SEL, idx);
        let max = self.r32(REG_QUEUE_NUM_MAX);
        let size = match inp.u8() % 4 {
            0 | 1 => max,
            2 => max >> (inp.u8() % 16),
            _ => inp.u32(),
        };
        self.w32(REG_QUEUE_NUM, size);
        // A plausible layout at `base`, or each part anywhere.
        let (desc, avail, used) = if inp.u8() & 1 == 0 {
            let base = Self::addr(inp);
            let s = u64::from(size.min(32768));
            let avail = base.wrapping_add(16 * s);
            (base, avail, avail.wrapping_add(6 + 2 * s + 3) & !3)
        } else {
            (Self::addr(inp), Self::addr(inp), Self::addr(inp))
        };
        for (lo, hi, a) in [
            (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, desc),
            (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, avail),
            (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, used),
        ] {
            self.w32(lo, a as u32);
            self.w32(hi, (a >> 32) as u32);
        }
        let ready = if inp.u8() & 7 == 7 { inp.u32() } else { 1 };
        self.w32(REG_QUEUE_READY, ready);
    }

    /// The driver's side of feature negotiation: both words, what it read or any value.
    fn features(&mut self, inp: &mut Input<'_>) {
        for sel in 0..2u32 {
            self.w32(REG_DEVICE_FEATURES_SEL, sel);
            let offered = self.r32(REG_DEVICE_FEATURES);
            let v = match inp.u8() % 4 {
                0 | 1 => offered,
                2 => offered & inp.u32(),
                _ => inp.u32(),
            };
            self.w32(REG_DRIVER_FEATURES_SEL, sel);
            self.w32(REG_DRIVER_FEATURES, v);
        }
    }

    fn device_pass(&mut self) {
        let mut queues = self.seen.queues.lock().unwrap();
        for q in queues.iter_mut() {
            rng::process_queue(q, &self.mem);
        }
    }

    fn command(&mut self, inp: &mut Input<'_>) {
        match inp.u8() % 16 {
            0..=3 => {
                let off = Self::offset(inp);
                let len = Self::len(inp);
                let v = inp.u64().to_le_bytes();
                let before = self.t.status();
                self.t.write(off, &v[..len]);
                if off == REG_STATUS && len == 4 && v[..4] == [0; 4] {
                    assert_eq!(self.t.status(), 0);
                    assert_eq!(self.t.acked_features(), 0);
                    assert!(!self.t.is_activated());
                    for q in 0..self.num_queues {
                        self.w32(REG_QUEUE_SEL, q);
                        assert_eq!(self.r32(REG_QUEUE_READY), 0);
                    }
                }
                // Only a status write changes the status.
                if off != REG_STATUS {
                    assert_eq!(self.t.status(), before, "write at {off:#x} changed the status");
                }
                self.check();
            }
            4 | 5 => {
                let off = Self::offset(inp);
                let len = Self::len(inp);
                let v = self.read(off, len.min(8));
                if len != 4 && off < CONFIG_SPACE {
                    assert_eq!(v, 0, "a {len}-byte register read returned data");
                }
            }
            6 => {
                // One status step: the next in order, any one bit, or any value.
                let s = self.t.status();
                let v = match inp.u8() % 4 {
                    0 | 1 => {
                        let next = [STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK, STATUS_DRIVER_OK]
                            .into_iter()
                            .find(|b| s & b == 0)
                            .unwrap_or(0);
                        s | next
                    }
                    2 => s | 1u32 << (inp.u8() % 32),
                    _ => inp.u32(),
                };
                self.w32(REG_STATUS, v);
            }
            7 => self.features(inp),
            8 | 9 => self.setup_queue(inp),
            10 => {
                // The whole bring-up, as Linux does it.
                self.w32(REG_STATUS, 0);
                self.w32(REG_STATUS, STATUS_ACKNOWLEDGE);
                self.w32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
                self.features(inp);
                self.w32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
                for _ in 0..self.num_queues {
                    self.setup_queue(inp);
                }
                self.w32(
                    REG_STATUS,
                    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
                );
            }
            11 => {
                let q = match inp.u8() {
                    0..=0xef => u32::from(inp.u8() % 4),
                    _ => inp.u32(),
                };
                self.w32(REG_QUEUE_NOTIFY, q);
            }
            12 => {
                let v = self.r32(REG_INTERRUPT_STATUS);
                let ack = if inp.u8() & 1 == 0 { v } else { inp.u32() };
                self.w32(REG_INTERRUPT_ACK, ack);
            }
            13 => {
                // Guest RAM: descriptors and rings for the device pass, or junk.
                let addr = match inp.u8() & 1 {
                    0 => u64::from(inp.u16()),
                    _ => 0x2_0000 + u64::from(inp.u16()),
                };
                let n = inp.u8() as usize;
                let _ = self.mem.write_slice(inp.bytes(n), GuestAddress(addr));
            }
            14 => self.device_pass(),
            _ => {
                // Reset mid-way.
                self.w32(REG_STATUS, 0);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let ranges: Vec<(GuestAddress, usize)> = RAM.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem: Mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let n = 1 + usize::from(inp.u8() % 3);
    let max_sizes = (0..n).map(|_| MAX_SIZES[inp.u8() as usize % MAX_SIZES.len()]).collect();
    let features = match inp.u8() % 4 {
        0 | 1 => VIRTIO_F_VERSION_1 | 0b101,
        2 => VIRTIO_F_VERSION_1 | inp.u64(),
        _ => inp.u64(),
    };
    let seen = Arc::new(Seen::default());
    let config = (0..inp.u8() % 64).collect();
    let device = Box::new(Dummy { max_sizes, features, config, mem: mem.clone(), seen: seen.clone() });
    let num_queues = n as u32;
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let evts = (0..num_queues).map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd")).collect();
    let t = MmioTransport::new(device, mem.clone(), irq, evts).expect("transport");
    let mut run = Run { t, mem, seen, num_queues };
    for _ in 0..MAX_COMMANDS {
        if inp.is_empty() {
            break;
        }
        run.command(&mut inp);
    }
    run.w32(REG_STATUS, 0);
    if std::env::var_os("HUSK_FUZZ_DEBUG").is_some_and(|v| v == "1") {
        eprintln!(
            "activations {} resets {} status {:#x}",
            run.seen.activations.load(Ordering::SeqCst),
            run.seen.resets.load(Ordering::SeqCst),
            run.t.status()
        );
    }
});
