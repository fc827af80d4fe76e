//! A built VM and its main loop: start the vCPUs, feed console input, wait for the guest to end.

use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::terminal::Terminal;

use crate::devices::legacy::SerialConsole;
use crate::devices::Bus;
use crate::exit::{ExitNotifier, ExitReason};
use crate::memory::GuestMem;
use crate::vstate::{StartGate, Vcpu, VcpuHandle, Vm};

/// What the control thread needs besides the VM itself (see `snapshot::control`).
#[derive(Debug)]
pub struct SnapshotSetup {
    pub endpoint: crate::snapshot::control::ControlEndpoint,
    pub identity: crate::snapshot::Identity,
    pub transports: Vec<Arc<Mutex<crate::devices::virtio::MmioTransport>>>,
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_STDIN: u64 = 1;
const TOKEN_SERIAL_DRAINED: u64 = 2;

/// Whether `--timings` asked for this run's timing points on stderr.
static TIMINGS: AtomicBool = AtomicBool::new(false);

/// Turns timing points on (`husk-vmm --timings`, which husk passes for `husk run --timings`).
pub fn report_timings() {
    TIMINGS.store(true, Ordering::Relaxed);
}

/// Whether `--timings` was given (other one-off reports, like the VM generation id, follow it).
pub fn timings_enabled() -> bool {
    TIMINGS.load(Ordering::Relaxed)
}

/// CLOCK_MONOTONIC in ns: the clock the runtime's timeline uses (runtime/core/src/timeline.rs).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass; clock_gettime is in every thread's
    // seccomp filter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// With `--timings`, one line on stderr the runtime reads back: `husk-vmm-timing: NAME NS`.
/// A write(2) on the log descriptor every thread already has: no file, no new syscall.
pub fn timing_point(name: &str, at_ns: u64) {
    if TIMINGS.load(Ordering::Relaxed) {
        eprintln!("husk-vmm-timing: {name} {at_ns}");
    }
}

#[derive(Debug)]
pub struct Vmm {
    // Field order is drop order: vCPUs stop before the VM and memory go away.
    vcpus: Vec<Vcpu>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitNotifier>,
    serial: Option<Arc<Mutex<SerialConsole>>>,
    stdin_input: bool,
    snapshot: Option<SnapshotSetup>,
    /// The VMGenID device, kept for the VM's life (its irqfd stays registered).
    vmgenid: Option<crate::devices::vmgenid::VmGenId>,
    // Shared with the control thread, which reads VM state for snapshots.
    vm: Arc<Vm>,
    mem: GuestMem,
}

/// Puts a terminal stdin in raw mode for the console and restores it on drop.
struct RawStdin(bool);

impl RawStdin {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(stdin.as_raw_fd()) } == 1;
        Self(tty && stdin.lock().set_raw_mode().is_ok())
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

impl Vmm {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vm: Vm,
        mem: GuestMem,
        vcpus: Vec<Vcpu>,
        pio: Bus,
        mmio: Bus,
        exit: Arc<ExitNotifier>,
        serial: Option<Arc<Mutex<SerialConsole>>>,
        stdin_input: bool,
    ) -> Self {
        let (pio, mmio, vm) = (Arc::new(pio), Arc::new(mmio), Arc::new(vm));
        Self { vcpus, pio, mmio, exit, serial, stdin_input, snapshot: None, vmgenid: None, vm, mem }
    }

    pub(crate) fn with_snapshots(mut self, snapshot: Option<SnapshotSetup>) -> Self {
        self.snapshot = snapshot;
        self
    }

    pub(crate) fn with_vmgenid(mut self, vmgenid: crate::devices::vmgenid::VmGenId) -> Self {
        self.vmgenid = Some(vmgenid);
        self
    }

    pub fn guest_memory(&self) -> &GuestMem {
        &self.mem
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Runs the guest until it powers off, panics, resets or fails.
    pub fn run(mut self) -> ExitReason {
        let mut handles: Vec<VcpuHandle> = Vec::new();
        let gate = Arc::new(StartGate::default());
        let mut started = true;
        let pauses: Vec<_> = self.vcpus.iter().map(Vcpu::pause_ctl).collect();
        for vcpu in self.vcpus.drain(..) {
            let stop = Arc::new(AtomicBool::new(false));
            match vcpu.start(self.pio.clone(), self.mmio.clone(), self.exit.clone(), stop, gate.clone()) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.exit.notify(ExitReason::VcpuError(e.to_string()));
                    started = false;
                    break;
                }
            }
        }
        if let (true, Some(s)) = (started, self.snapshot.take()) {
            let sources = crate::snapshot::control::SnapshotSources {
                vm: self.vm.clone(),
                mem: self.mem.clone(),
                vcpus: pauses,
                transports: s.transports,
                serial: self.serial.clone(),
                identity: s.identity,
                exit: self.exit.clone(),
            };
            if let Err(e) = crate::snapshot::control::start(s.endpoint, sources) {
                self.exit.notify(ExitReason::VcpuError(format!("control thread: {e}")));
                started = false;
            }
        }
        // The main thread is the last to confine itself; the guest starts after that.
        if let Err(e) = crate::confine::confine_thread(crate::confine::ThreadKind::Main) {
            self.exit.notify(ExitReason::VcpuError(e.to_string()));
            started = false;
        }
        gate.open(started);
        // A restored VM hears of its new generation id as soon as it runs.
        if let (true, Some(g)) = (started, &self.vmgenid) {
            if let Err(e) = g.start() {
                self.exit.notify(ExitReason::VcpuError(e.to_string()));
            }
        }
        if started && std::env::var_os("HUSK_VMM_SECCOMP_SELFTEST").is_some() {
            crate::confine::forbidden_syscall();
        }
        let reason = match self.event_loop() {
            Ok(r) => r,
            Err(e) => ExitReason::VcpuError(format!("event loop: {e}")),
        };
        for h in &mut handles {
            h.stop();
        }
        reason
    }

    fn event_loop(&mut self) -> std::io::Result<ExitReason> {
        let epoll = Epoll::new()?;
        let add =
            |fd: i32, token: u64| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(self.exit.eventfd().as_raw_fd(), TOKEN_EXIT)?;
        let stdin = std::io::stdin();
        let stdin_fd = stdin.as_raw_fd();
        let _raw = RawStdin::enter();
        let mut stdin_open = false;
        let drained = self.serial.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).drained_evt());
        if let (true, Some(drained)) = (self.stdin_input, &drained) {
            // Regular files and /dev/null cannot be polled: such stdin is simply not console input.
            stdin_open = add(stdin_fd, TOKEN_STDIN).is_ok();
            add(drained.as_raw_fd(), TOKEN_SERIAL_DRAINED)?;
        }
        let mut events = [EpollEvent::default(); 4];
        let mut buf = [0u8; 64];
        loop {
            if let Some(reason) = self.exit.reason() {
                return Ok(reason);
            }
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => {
                        let _ = self.exit.eventfd().read();
                    }
                    TOKEN_STDIN => {
                        let Some(serial) = &self.serial else { continue };
                        let mut s = serial.lock().unwrap_or_else(|p| p.into_inner());
                        let room = s.fifo_capacity().min(buf.len());
                        if room == 0 {
                            // Guest is not reading: stop polling stdin until it drains the FIFO.
                            epoll.ctl(ControlOperation::Delete, stdin_fd, EpollEvent::default())?;
                            stdin_open = false;
                            continue;
                        }
                        match stdin.lock().read(&mut buf[..room]) {
                            Ok(0) | Err(_) => {
                                let _ = epoll.ctl(ControlOperation::Delete, stdin_fd, EpollEvent::default());
                                stdin_open = false;
                                // EOF for good: don't re-arm on drain.
                                self.stdin_input = false;
                            }
                            Ok(got) => {
                                s.enqueue_input(&buf[..got]);
                            }
                        }
                    }
                    TOKEN_SERIAL_DRAINED => {
                        if let Some(d) = &drained {
                            let _ = d.read();
                        }
                        if self.stdin_input && !stdin_open {
                            stdin_open = add(stdin_fd, TOKEN_STDIN).is_ok();
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
