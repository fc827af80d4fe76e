//! Turns a validated [`VmConfig`] into a ready-to-run [`Vmm`]: memory, irqchip, devices, kernel,
//! boot tables and vCPUs, in the order KVM requires.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi::AcpiDevice;
use crate::arch::boot::{self, KernelKind};
use crate::arch::layout::{GED_GSI, IRQ_MAX, VIRTIO_IRQ_START, VIRTIO_MMIO_START, VMGENID_ADDR};
use crate::arch::{acpi, regs};
use crate::config::{ConfigError, SerialConfig, VmConfig};
use crate::devices::legacy::{i8042, pvpanic, serial, sleep_ctl};
use crate::devices::legacy::{AcpiSleepControl, PvPanic, SerialConsole, SerialOutput, I8042};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_LEN, REG_QUEUE_NOTIFY};
use crate::devices::virtio::{rng::Rng, vsock::Vsock, VirtioDevice, VirtioInterrupt};
use crate::devices::vmgenid::{self, VmGenId};
use crate::devices::{Bus, BusError};
use crate::exit::ExitNotifier;
use crate::memory::{create_guest_memory, GuestMem, MemoryError};
use crate::snapshot::busy_chunks;
use crate::snapshot::control::ControlEndpoint;
use crate::snapshot::{Identity, Snapshot, SnapshotError, SnapshotOptions, TransportState};
use crate::vmm::{SnapshotSetup, Vmm};
use crate::vstate::{Vcpu, VcpuError, Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("too many devices: no interrupt line left")]
    OutOfIrqs,
    #[error("serial output file {path}: {source}")]
    SerialFile { path: String, source: std::io::Error },
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error("virtio queue setup: {0:?}")]
    Queue(virtio_queue::Error),
    #[error("virtio-fs share {tag:?}: {source}")]
    FsShare { tag: String, source: std::io::Error },
    #[error(transparent)]
    Confine(#[from] crate::confine::ConfineError),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error("device thread: {0}")]
    Worker(#[source] crate::devices::virtio::ActivateError),
    #[error("virtio-net: {0}")]
    Tap(#[from] crate::devices::virtio::net::tap::TapError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    VmGenId(#[from] vmgenid::VmGenIdError),
}

/// A random locally administered unicast MAC (02:xx:...).
fn random_mac() -> [u8; 6] {
    let mut m = [0u8; 6];
    // SAFETY: getrandom writes at most `m.len()` bytes into `m`; on failure `m` stays zero
    // apart from the fixed bits below, which is still a valid address.
    unsafe { libc::getrandom(m.as_mut_ptr().cast(), m.len(), 0) };
    m[0] = (m[0] & 0xfe) | 0x02;
    m
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Io { what, source }
}

/// Places virtio-mmio devices one page apart with consecutive GSIs, and records them for the
/// DSDT, which is how the guest finds them.
struct VirtioPlacer {
    next: u32,
    acpi: Vec<AcpiDevice>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl VirtioPlacer {
    fn add(
        &mut self,
        vm: &Vm,
        mem: &GuestMem,
        mmio: &mut Bus,
        mut device: Box<dyn VirtioDevice>,
        restore: Option<&TransportState>,
    ) -> Result<(), BuildError> {
        device.start_threads().map_err(BuildError::Worker)?;
        let irq = VIRTIO_IRQ_START + self.next;
        if irq > IRQ_MAX {
            return Err(BuildError::OutOfIrqs);
        }
        let base = VIRTIO_MMIO_START + u64::from(self.next) * MMIO_LEN;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(io_err("irqfd"))?;
        vm.register_irqfd(&irqfd, irq)?;
        let mut queue_evts = Vec::new();
        for q in 0..device.queue_max_sizes().len() {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("ioeventfd"))?;
            vm.register_mmio_ioevent(&evt, base + REG_QUEUE_NOTIFY, q as u32)?;
            queue_evts.push(evt);
        }
        let interrupt = Arc::new(VirtioInterrupt::new(irqfd));
        let transport = match restore {
            Some(state) => MmioTransport::restore(device, mem.clone(), interrupt, queue_evts, state)?,
            None => {
                MmioTransport::new(device, mem.clone(), interrupt, queue_evts).map_err(BuildError::Queue)?
            }
        };
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, MMIO_LEN)?;
        self.transports.push(transport);
        // MMIO windows sit below 4 GiB by construction (VIRTIO_MMIO_START + a few pages).
        self.acpi.push(AcpiDevice::VirtioMmio { base: base as u32, len: MMIO_LEN as u32, gsi: irq });
        self.next += 1;
        Ok(())
    }
}

pub fn build_vmm(cfg: &VmConfig) -> Result<Vmm, BuildError> {
    build_vmm_with(cfg, &SnapshotOptions::default())
}

fn file_len(what: &'static str, path: &std::path::Path) -> Result<u64, BuildError> {
    std::fs::metadata(path).map(|m| m.len()).map_err(io_err(what))
}

/// Reads a snapshot directory: the state file, checked, and the memory file, opened.
fn load_snapshot(dir: &std::path::Path) -> Result<(Snapshot, std::fs::File), SnapshotError> {
    let snap = crate::snapshot::file::read(&dir.join(crate::snapshot::STATE_FILE))?;
    let mem = std::fs::File::open(dir.join(crate::snapshot::MEMORY_FILE))
        .map_err(|source| SnapshotError::Io { what: "open memory file", source })?;
    Ok((snap, mem))
}

/// Copies the (at most `max`) chunks `ws` shows busiest into private 2 MiB pages, where the
/// host has them, and returns their addresses.
fn copy_busy_chunks(
    mem: &crate::memory::GuestMem,
    file: &std::fs::File,
    regions: &[crate::snapshot::state::MemRegion],
    ws: &crate::snapshot::working_set::WorkingSet,
    max: usize,
) -> Result<Vec<u64>, BuildError> {
    let want = busy_chunks::budget(max);
    if want == 0 {
        tracing::debug!(
            "working set: no busy chunks copied (none asked for, no transparent huge pages, or no free 2 MiB block)"
        );
        return Ok(Vec::new());
    }
    let chunks = ws.busy_written_chunks(busy_chunks::MIN_SCORE, want);
    let copied = busy_chunks::copy_in(mem, file, regions, &chunks)?;
    if !copied.is_empty() {
        crate::vmm::timing_point("busy chunks in 2 MiB pages", crate::vmm::monotonic_ns());
    }
    tracing::debug!("working set: {} of {} busy chunks copied into 2 MiB pages", copied.len(), chunks.len());
    Ok(copied)
}

/// The snapshot's working set, if it has one that parses; a bad one is only a lost hint.
fn load_working_set(dir: &std::path::Path) -> Option<crate::snapshot::working_set::WorkingSet> {
    use crate::snapshot::working_set::{WorkingSet, WORKING_SET_FILE};
    WorkingSet::load(&dir.join(WORKING_SET_FILE)).unwrap_or_else(|e| {
        tracing::warn!("snapshot working set left out: {e}");
        None
    })
}

/// KVM_CREATE_VM on a thread of its own, while the VMM reads its input: on Linux 6.1 the
/// ioctl waits for the VM's NX huge page recovery worker to join the VMM's cgroups, which
/// takes an RCU grace period, time the VMM would otherwise spend asleep.
enum VmCreation {
    Started(std::thread::JoinHandle<Result<Vm, VmError>>),
    /// No thread could be started: created in place, when needed.
    Inline(u32),
}

impl VmCreation {
    fn start(vcpus: u32) -> Self {
        match std::thread::Builder::new().name("kvm-create".into()).spawn(move || Vm::new(vcpus)) {
            Ok(h) => Self::Started(h),
            Err(e) => {
                tracing::debug!("creating the VM in place: {e}");
                Self::Inline(vcpus)
            }
        }
    }

    /// The VM; the thread is gone once this returns (the jail wants a single thread).
    fn finish(self) -> Result<Vm, VmError> {
        match self {
            Self::Started(h) => h.join().unwrap_or(Err(VmError::CreateThread)),
            Self::Inline(vcpus) => Vm::new(vcpus),
        }
    }
}

/// Like [`build_vmm`], and also restores from a snapshot or takes control commands.
pub fn build_vmm_with(cfg: &VmConfig, opts: &SnapshotOptions) -> Result<Vmm, BuildError> {
    cfg.validate()?;
    let creating = VmCreation::start(cfg.vcpus);
    crate::confine::narrow_bounding()?;
    // Snapshot input is checked before anything is set up for it.
    let restore = opts.restore.as_deref().map(load_snapshot).transpose()?;
    let working_set = opts.restore.as_deref().and_then(load_working_set);
    let image_lens = (
        file_len("kernel", &cfg.kernel)?,
        cfg.initramfs.as_deref().map(|p| file_len("initramfs", p)).transpose()?,
    );
    if let Some((snap, _)) = &restore {
        // The VM's shape first, for a clear message before anything is sized from the file.
        let claimed = &snap.identity;
        claimed.check(&Identity {
            memory_mib: cfg.memory_mib,
            vcpus: cfg.vcpus,
            image_id: opts.image_id.clone(),
            kernel_len: image_lens.0,
            initramfs_len: image_lens.1,
            serial: claimed.serial,
            devices: claimed.devices.clone(),
        })?;
        snap.vmgenid.check()?;
        crate::vmm::timing_point("snapshot read", crate::vmm::monotonic_ns());
    }
    let control = opts
        .control
        .as_deref()
        .map(|p| ControlEndpoint::bind(p, opts.snapshot_dir.as_deref(), opts.restore.is_some()))
        .transpose()?;
    // Guest memory is mapped and filled while KVM_CREATE_VM waits on its thread (that wait is
    // idle, see VmCreation), and before KVM is touched, so bad input is reported as such on
    // any host. The mapping and the images need nothing of the jail.
    let (mem, boot_images) = match &restore {
        Some((snap, file)) => {
            let file = file.try_clone().map_err(io_err("memory file"))?;
            let mem = crate::snapshot::memory::map(
                file.try_clone().map_err(io_err("memory file"))?,
                &snap.memory,
                cfg.memory_mib,
            )?;
            if let Some(ws) = &working_set {
                let max = opts.private_chunks.unwrap_or(busy_chunks::DEFAULT_CHUNKS);
                let busy = copy_busy_chunks(&mem, &file, &snap.memory, ws, max)?;
                match ws.copy_written(&mem, &busy) {
                    Ok(copied) => {
                        tracing::debug!("working set: {copied} written pages copied ahead");
                        crate::vmm::timing_point("working set mapped", crate::vmm::monotonic_ns());
                    }
                    Err(e) => tracing::warn!("snapshot working set left out: {e}"),
                }
            }
            (mem, None)
        }
        None => {
            let mem = create_guest_memory(cfg.memory_mib)?;
            let kernel = boot::load_kernel(&mem, &cfg.kernel)?;
            crate::vmm::timing_point("kernel loaded", crate::vmm::monotonic_ns());
            let initrd_max = match kernel.kind {
                KernelKind::BzImage { header, .. } if header.initrd_addr_max != 0 => {
                    u64::from(header.initrd_addr_max)
                }
                _ => u64::MAX,
            };
            let initrd = cfg
                .initramfs
                .as_ref()
                .map(|p| boot::load_initrd(&mem, p, kernel.end, initrd_max))
                .transpose()?;
            crate::vmm::timing_point("initramfs loaded", crate::vmm::monotonic_ns());
            (mem, Some((kernel, initrd)))
        }
    };

    // Before the jail (namespaces can only be entered while the VMM has one thread); its
    // errors are reported where KVM was always first touched, after the input's.
    let vm = creating.finish();
    // Before the jail closes inherited descriptors; a bad one is reported and left alone.
    if let Some(fd) = opts.vm_handover {
        match crate::handover::socket(fd) {
            Ok(sock) => {
                if let Ok(v) = &vm {
                    crate::handover::send(sock, v.fd());
                }
            }
            Err(e) => tracing::warn!("--vm-handover {fd}: {e}"),
        }
    }
    crate::confine::enable(cfg.seccomp)?;
    let (jail, jailed);
    let cfg = match &cfg.jail {
        Some(j) => {
            // What was opened for the snapshot before the jail stays open through it.
            let mut keep: Vec<std::os::fd::RawFd> =
                restore.as_ref().map(|(_, f)| std::os::fd::AsRawFd::as_raw_fd(f)).into_iter().collect();
            keep.extend(control.as_ref().map(|c| c.fds()).unwrap_or_default());
            keep.extend(vm.as_ref().map(|v| v.raw_fds()).into_iter().flatten());
            let (built, c) = crate::jail::prepare(j, cfg, &keep)?;
            crate::vmm::timing_point("jail prepared", crate::vmm::monotonic_ns());
            (jail, jailed) = (Some(built), c);
            &jailed
        }
        None => {
            jail = None;
            cfg
        }
    };
    let vm = vm?;
    vm.register_memory(&mem)?;
    vm.setup_irqchip()?;
    // The Generic Event Device's interrupt: how a restored VM learns of its new generation id.
    let ged_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("GED irqfd"))?;
    vm.register_irqfd(&ged_irq, GED_GSI)?;

    let exit = Arc::new(ExitNotifier::new().map_err(io_err("exit eventfd"))?);
    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    let serial = match &cfg.serial {
        SerialConfig::None => None,
        other => {
            let out = match other {
                SerialConfig::File(path) => SerialOutput::File(
                    std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|source| {
                        BuildError::SerialFile { path: path.display().to_string(), source }
                    })?,
                ),
                _ => SerialOutput::Stdout,
            };
            let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("serial irqfd"))?;
            vm.register_irqfd(&irq, serial::COM1_IRQ)?;
            let console = match restore.as_ref().and_then(|(s, _)| s.serial.as_ref()) {
                Some(state) => SerialConsole::restore(irq, out, state),
                None => SerialConsole::new(irq, out),
            };
            let dev = Arc::new(Mutex::new(console.map_err(io_err("serial"))?));
            pio.insert(dev.clone(), serial::COM1_PORT, serial::PORT_LEN)?;
            Some(dev)
        }
    };
    pio.insert(Arc::new(Mutex::new(I8042::new(exit.clone()))), i8042::PORT_BASE, i8042::PORT_LEN)?;
    pio.insert(
        Arc::new(Mutex::new(AcpiSleepControl::new(exit.clone()))),
        sleep_ctl::PORT,
        sleep_ctl::PORT_LEN,
    )?;
    pio.insert(Arc::new(Mutex::new(PvPanic::new(exit.clone()))), pvpanic::PORT, pvpanic::PORT_LEN)?;

    // Devices are made with the host's view (shares through their jail binds, taps); their
    // threads start only once the VMM is in its jail.
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if cfg.rng {
        devices.push(Box::new(Rng::new()));
    }
    for share in &cfg.fs {
        let dev = crate::devices::virtio::fs::Fs::new(share)
            .map_err(|source| BuildError::FsShare { tag: share.tag.clone(), source })?;
        devices.push(Box::new(dev));
    }
    if let Some(v) = &cfg.vsock {
        devices.push(Box::new(Vsock::new(v.guest_cid, v.uds_path.clone())));
    }
    for n in &cfg.net {
        let tap = n.tap.as_deref().map(crate::devices::virtio::net::tap::Tap::open).transpose()?;
        let mac = n.mac.map(|m| m.0).unwrap_or_else(random_mac);
        devices.push(Box::new(crate::devices::virtio::net::Net::new(tap, mac, n.mtu)));
    }
    let listener = match (&cfg.vsock, &cfg.loopback_forward) {
        (Some(_), Some(f)) => Some(
            crate::loopback_forward::bind(f)
                .map_err(|source| BuildError::Io { what: "loopback forward listener", source })?,
        ),
        _ => None,
    };
    let identity = Identity {
        memory_mib: cfg.memory_mib,
        vcpus: cfg.vcpus,
        image_id: opts.image_id.clone(),
        kernel_len: image_lens.0,
        initramfs_len: image_lens.1,
        serial: serial.is_some(),
        devices: devices.iter().map(|d| crate::devices::virtio::mmio::device_identity(d.as_ref())).collect(),
    };
    if let Some((snap, _)) = &restore {
        snap.identity.check(&identity)?;
        if snap.vcpus.len() != cfg.vcpus as usize || snap.devices.len() != devices.len() {
            return Err(
                SnapshotError::Invalid("vCPU or device count differs from its identity".into()).into()
            );
        }
        if snap.serial.is_some() != serial.is_some() {
            return Err(SnapshotError::Invalid("serial state present without a serial console".into()).into());
        }
    }
    crate::vmm::timing_point("devices made", crate::vmm::monotonic_ns());
    if let Some(j) = jail {
        j.enter()?;
        crate::vmm::timing_point("jail entered", crate::vmm::monotonic_ns());
    }
    // A restored VM's interrupt controllers and vCPUs are back before any device runs: an
    // interrupt raised earlier (for a host connection already waiting on the vsock socket)
    // would be overwritten by their saved state, and the guest would never see it.
    let restored_vcpus = match &restore {
        Some((snap, _)) => {
            crate::snapshot::kvm_state::restore_vm(vm.fd(), &snap.vm)?;
            let mut vcpus = Vec::with_capacity(snap.vcpus.len());
            for (i, state) in snap.vcpus.iter().enumerate() {
                let vcpu = Vcpu::new(&vm, i as u32)?;
                crate::snapshot::kvm_state::restore_vcpu(vcpu.fd(), state)?;
                vcpus.push(vcpu);
            }
            Some(vcpus)
        }
        None => None,
    };
    let mut placer = VirtioPlacer { next: 0, acpi: Vec::new(), transports: Vec::new() };
    let saved_devices = restore.as_ref().map(|(s, _)| s.devices.as_slice()).unwrap_or_default();
    for (i, dev) in devices.into_iter().enumerate() {
        placer.add(&vm, &mem, &mut mmio, dev, saved_devices.get(i))?;
    }
    if let (Some(l), Some(v)) = (listener, &cfg.vsock) {
        crate::loopback_forward::start(l, v.uds_path.clone())
            .map_err(|source| BuildError::Io { what: "loopback forward thread", source })?;
    }

    let snapshot = control.map(|endpoint| SnapshotSetup {
        endpoint,
        identity: identity.clone(),
        transports: placer.transports.clone(),
    });
    if let (Some((snap, _)), Some(vcpus)) = (&restore, restored_vcpus) {
        crate::vmm::timing_point("devices restored", crate::vmm::monotonic_ns());
        // This sibling is a new VM to the guest: its id is in place before any vCPU runs, and
        // the VMM announces it once they do (the guest's driver then reseeds its RNG).
        let genid = VmGenId::new(&mem, ged_irq, vmgenid::next_id(&snap.vmgenid.generation)?)?;
        report_generation(genid.generation());
        return finish(vm, mem, vcpus, pio, mmio, exit, serial, cfg, snapshot, genid.announce_on_start());
    }
    let Some((kernel, initrd)) = boot_images else {
        return Err(SnapshotError::Invalid("nothing to boot".into()).into());
    };

    let cmdline = cfg.cmdline.clone();
    let mut acpi_devices = Vec::new();
    if serial.is_some() {
        acpi_devices.push(AcpiDevice::Serial {
            port: serial::COM1_PORT as u16,
            len: serial::PORT_LEN as u8,
            gsi: serial::COM1_IRQ,
        });
    }
    acpi_devices.extend(placer.acpi.iter().copied());
    acpi_devices.push(AcpiDevice::VmGenId { addr: VMGENID_ADDR, gsi: GED_GSI });
    let genid = VmGenId::new(&mem, ged_irq, vmgenid::random_id()?)?;
    report_generation(genid.generation());
    boot::write_cmdline(&mem, &cmdline)?;
    let (rsdp, _) = acpi::write_acpi_tables(&mem, cfg.vcpus, &acpi_devices)?;
    let entry = match kernel.kind {
        KernelKind::Pvh { entry } => boot::write_pvh_info(&mem, entry, initrd, rsdp)?,
        KernelKind::BzImage { load_addr, header } => {
            boot::write_zero_page(&mem, load_addr, header, cmdline.len(), initrd, rsdp)?
        }
    };
    regs::write_boot_tables(&mem, entry)?;

    let supported = vm.supported_cpuid()?;
    let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
    for i in 0..cfg.vcpus {
        let vcpu = Vcpu::new(&vm, i)?;
        vcpu.configure(&supported, cfg.vcpus, (i == 0).then_some(entry))?;
        vcpus.push(vcpu);
    }
    tracing::debug!(cmdline, "VM built");
    finish(vm, mem, vcpus, pio, mmio, exit, serial, cfg, snapshot, genid)
}

/// The VM generation id in the debug log, and with `--timings` on stderr for tests and tools
/// (`husk-vmm-genid: <32 hex>`; not a `husk-vmm:` line, which husk reads as an error report).
fn report_generation(id: &vmgenid::GenerationId) {
    let hex = vmgenid::hex(id);
    tracing::debug!(generation = %hex, "VM generation id");
    if crate::vmm::timings_enabled() {
        eprintln!("husk-vmm-genid: {hex}");
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    vm: Vm,
    mem: GuestMem,
    vcpus: Vec<Vcpu>,
    pio: Bus,
    mmio: Bus,
    exit: Arc<ExitNotifier>,
    serial: Option<Arc<Mutex<SerialConsole>>>,
    cfg: &VmConfig,
    snapshot: Option<SnapshotSetup>,
    genid: VmGenId,
) -> Result<Vmm, BuildError> {
    if snapshot.is_some() {
        // vCPUs save their own MSRs when paused, under a filter without KVM's system ioctls.
        let list = vm.msr_index_list()?;
        for v in &vcpus {
            let _ = v.pause_ctl().msr_index_list.set(list.clone());
        }
    }
    let vmm = Vmm::new(vm, mem, vcpus, pio, mmio, exit, serial, cfg.serial == SerialConfig::Stdio);
    Ok(vmm.with_snapshots(snapshot).with_vmgenid(genid))
}
