//! vCPUs: per-CPU state setup and the thread that runs KVM_RUN and dispatches exits.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::{cpuid, interrupts, msr, regs};
use crate::devices::Bus;
use crate::exit::{ExitNotifier, ExitReason};
use crate::vstate::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("create vCPU {0}: {1}")]
    Create(u32, kvm_ioctls::Error),
    #[error("vCPU {index} {what}: {source}")]
    Kvm { index: u32, what: &'static str, source: kvm_ioctls::Error },
    #[error("vCPU {0} MSRs: {1}")]
    Msr(u32, msr::MsrError),
    #[error("vCPU {0} registers: {1}")]
    Regs(u32, regs::RegsError),
    #[error("spawn vCPU thread: {0}")]
    Spawn(std::io::Error),
}

/// Signal used to knock a vCPU thread out of KVM_RUN when the VM stops.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    index: u32,
    pause: Arc<PauseCtl>,
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u32) -> Result<Self, VcpuError> {
        let fd = vm.fd().create_vcpu(index as u64).map_err(|e| VcpuError::Create(index, e))?;
        Ok(Self { fd, index, pause: Arc::new(PauseCtl::default()) })
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// How a snapshot parks this vCPU and collects its state (see [`PauseCtl`]).
    pub fn pause_ctl(&self) -> Arc<PauseCtl> {
        self.pause.clone()
    }

    /// CPUID, MSRs, FPU and LAPIC for every vCPU; entry registers for the boot vCPU. The others
    /// wait in KVM for the guest's INIT/SIPI.
    pub fn configure(
        &self,
        supported: &CpuId,
        count: u32,
        boot: Option<regs::BootEntry>,
    ) -> Result<(), VcpuError> {
        let kvm = |what| move |source| VcpuError::Kvm { index: self.index, what, source };
        self.fd.set_cpuid2(&cpuid::vcpu_cpuid(supported, self.index, count)).map_err(kvm("set CPUID"))?;
        msr::setup_msrs(&self.fd).map_err(|e| VcpuError::Msr(self.index, e))?;
        self.fd.set_fpu(&regs::boot_fpu()).map_err(kvm("set FPU"))?;
        interrupts::setup_lapic(&self.fd).map_err(kvm("set LAPIC"))?;
        if let Some(entry) = boot {
            regs::setup_boot_vcpu(&self.fd, entry).map_err(|e| VcpuError::Regs(self.index, e))?;
        }
        Ok(())
    }

    /// Starts the run loop on its own thread.
    pub fn start(
        self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitNotifier>,
        stop: Arc<AtomicBool>,
        gate: Arc<StartGate>,
    ) -> Result<VcpuHandle, VcpuError> {
        // SAFETY: the handler does nothing; it exists only so the signal interrupts KVM_RUN.
        register_signal_handler(kick_signal(), noop_handler).map_err(|e| VcpuError::Spawn(e.into()))?;
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn({
                let stop = stop.clone();
                move || {
                    // SAFETY: gettid has no preconditions.
                    self.pause.tid.store(unsafe { libc::gettid() }, Ordering::Release);
                    // Confined before its first KVM_RUN; run only once every thread is.
                    let confined = crate::confine::confine_thread(crate::confine::ThreadKind::Vcpu);
                    if !gate.wait() {
                        return;
                    }
                    match confined {
                        Ok(()) => self.run_loop(&pio, &mmio, &exit, &stop),
                        Err(e) => exit.notify(ExitReason::VcpuError(format!("vCPU {index}: {e}"))),
                    }
                }
            })
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle { thread: Some(thread), stop })
    }

    fn run_loop(mut self, pio: &Bus, mmio: &Bus, exit: &ExitNotifier, stop: &AtomicBool) {
        if self.index == 0 {
            crate::vmm::timing_point("first vCPU entry", crate::vmm::monotonic_ns());
        }
        while !stop.load(Ordering::Acquire) {
            if self.pause.requested.load(Ordering::Acquire) {
                self.park(stop);
                continue;
            }
            match self.run_once(pio, mmio) {
                Ok(None) => {}
                Ok(Some(reason)) => {
                    exit.notify(reason);
                    return;
                }
                Err(msg) => {
                    exit.notify(ExitReason::VcpuError(format!("vCPU {}: {msg}", self.index)));
                    return;
                }
            }
        }
    }

    /// Saves this vCPU's state for a snapshot and waits until it is resumed or stopped.
    fn park(&mut self, stop: &AtomicBool) {
        // The exit we last handled (a port or MMIO read) completes only inside the next
        // KVM_RUN; with immediate_exit set KVM completes it and returns without running the
        // guest, so the state read below is at an instruction boundary.
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        let saved =
            self.pause.msr_index_list.get().ok_or_else(|| "MSR list unknown".to_string()).and_then(|list| {
                crate::snapshot::kvm_state::save_vcpu(&self.fd, list).map_err(|e| e.to_string())
            });
        self.pause.park(saved, stop);
    }

    /// One KVM_RUN; returns the reason the VM must stop, if any.
    fn run_once(&mut self, pio: &Bus, mmio: &Bus) -> Result<Option<ExitReason>, String> {
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if !pio.write(u64::from(port), data) {
                    tracing::trace!(port, ?data, "unhandled port write");
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(u64::from(port), data) {
                    // Nothing decodes this port: the bus floats high, as on a PC.
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    tracing::trace!(addr, "unhandled MMIO read");
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !mmio.write(addr, data) {
                    tracing::trace!(addr, "unhandled MMIO write");
                }
            }
            Ok(VcpuExit::Hlt) => {
                return Ok(Some(ExitReason::VcpuError("vCPU halted with interrupts off".into())))
            }
            Ok(VcpuExit::Shutdown) => return Ok(Some(ExitReason::TripleFault)),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Ok(Some(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => ExitReason::GuestReset,
                    KVM_SYSTEM_EVENT_CRASH => ExitReason::GuestPanic,
                    other => ExitReason::VcpuError(format!("unknown system event {other}")),
                }));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(format!("KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"));
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: reading the kvm_run union member KVM filled for KVM_EXIT_INTERNAL_ERROR.
                let sub = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let what = if sub == 1 { "instruction emulation failure" } else { "internal error" };
                return Err(format!("KVM {what} (suberror {sub})"));
            }
            Ok(other) => tracing::debug!(exit = ?other, "ignored vCPU exit"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
        Ok(None)
    }
}

/// A vCPU's pause for snapshots: the controller asks, kicks the thread out of KVM_RUN, takes
/// the state the thread saved for itself, then resumes it.
#[derive(Debug, Default)]
pub struct PauseCtl {
    requested: AtomicBool,
    /// The vCPU thread's kernel id, for the kick (a tgkill to a gone thread is harmless).
    tid: AtomicI32,
    /// What `save_vcpu` reads; filled in at set-up, where KVM's system ioctls are allowed.
    pub msr_index_list: std::sync::OnceLock<Vec<u32>>,
    slot: Mutex<PauseSlot>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct PauseSlot {
    saved: Option<Result<crate::snapshot::state::VcpuState, String>>,
    resume: bool,
}

impl PauseCtl {
    fn park(&self, saved: Result<crate::snapshot::state::VcpuState, String>, stop: &AtomicBool) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.saved = Some(saved);
        self.cv.notify_all();
        // Stop is a flag plus a signal, which does not wake a condvar: poll it.
        while !slot.resume && !stop.load(Ordering::Acquire) {
            slot = self.cv.wait_timeout(slot, Duration::from_millis(20)).unwrap_or_else(|p| p.into_inner()).0;
        }
        slot.resume = false;
    }

    /// Parks the vCPU and returns its saved state, or an error if it did not park within
    /// `timeout` (it may then still park later; [`PauseCtl::resume`] lets it go either way).
    pub fn pause(&self, timeout: Duration) -> Result<crate::snapshot::state::VcpuState, String> {
        {
            let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
            slot.saved = None;
            slot.resume = false;
        }
        self.requested.store(true, Ordering::Release);
        let deadline = std::time::Instant::now() + timeout;
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(saved) = slot.saved.take() {
                return saved;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err("vCPU did not pause".into());
            }
            // Kick until it parks: a signal can land just before the thread enters KVM_RUN.
            let tid = self.tid.load(Ordering::Acquire);
            if tid > 0 {
                // SAFETY: tgkill only signals a thread of this process; the handler is a no-op.
                unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, kick_signal()) };
            }
            slot = self.cv.wait_timeout(slot, Duration::from_millis(2)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Lets a parked (or about to park) vCPU run again.
    pub fn resume(&self) {
        self.requested.store(false, Ordering::Release);
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.resume = true;
        slot.saved = None;
        self.cv.notify_all();
    }
}

/// Holds vCPU threads back until the rest of the VMM is confined: the guest's first
/// instruction runs only then.
#[derive(Debug, Default)]
pub struct StartGate {
    state: std::sync::Mutex<Option<bool>>,
    cv: std::sync::Condvar,
}

impl StartGate {
    /// Lets the vCPUs run (`true`) or makes them return without running (`false`).
    pub fn open(&self, run: bool) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(run);
        self.cv.notify_all();
    }

    fn wait(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(run) = *s {
                return run;
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl VcpuHandle {
    /// Makes the thread leave KVM_RUN and joins it. The signal is repeated because it can land
    /// just before the thread re-enters KVM_RUN.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let Some(thread) = self.thread.take() else { return };
        for _ in 0..2000 {
            if thread.is_finished() {
                break;
            }
            // SAFETY: the pthread is alive until joined below.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_millis(1));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            tracing::warn!("vCPU thread did not stop; leaving it to process exit");
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
