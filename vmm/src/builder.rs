//! Turns a validated [`VmConfig`] into a ready-to-run [`Vmm`]: memory, irqchip, devices, kernel,
//! boot tables and vCPUs, in the order KVM requires.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi::AcpiDevice;
use crate::arch::boot::{self, KernelKind};
use crate::arch::layout::{IRQ_MAX, VIRTIO_IRQ_START, VIRTIO_MMIO_START};
use crate::arch::{acpi, regs};
use crate::config::{ConfigError, SerialConfig, VmConfig};
use crate::devices::legacy::{i8042, pvpanic, serial, sleep_ctl};
use crate::devices::legacy::{AcpiSleepControl, PvPanic, SerialConsole, SerialOutput, I8042};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_LEN, REG_QUEUE_NOTIFY};
use crate::devices::virtio::{rng::Rng, vsock::Vsock, VirtioDevice, VirtioInterrupt};
use crate::devices::{Bus, BusError};
use crate::exit::ExitNotifier;
use crate::memory::{create_guest_memory, GuestMem, MemoryError};
use crate::vmm::Vmm;
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
}

impl VirtioPlacer {
    fn add(
        &mut self,
        vm: &Vm,
        mem: &GuestMem,
        mmio: &mut Bus,
        mut device: Box<dyn VirtioDevice>,
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
        let transport =
            MmioTransport::new(device, mem.clone(), interrupt, queue_evts).map_err(BuildError::Queue)?;
        mmio.insert(Arc::new(Mutex::new(transport)), base, MMIO_LEN)?;
        // MMIO windows sit below 4 GiB by construction (VIRTIO_MMIO_START + a few pages).
        self.acpi.push(AcpiDevice::VirtioMmio { base: base as u32, len: MMIO_LEN as u32, gsi: irq });
        self.next += 1;
        Ok(())
    }
}

pub fn build_vmm(cfg: &VmConfig) -> Result<Vmm, BuildError> {
    cfg.validate()?;
    crate::confine::enable(cfg.seccomp)?;
    // The jail comes first: namespaces can only be entered while the VMM has one thread.
    let (jail, jailed);
    let cfg = match &cfg.jail {
        Some(j) => {
            let (built, c) = crate::jail::prepare(j, cfg)?;
            (jail, jailed) = (Some(built), c);
            &jailed
        }
        None => {
            jail = None;
            cfg
        }
    };
    // Images are loaded before KVM is touched so that bad input is reported as such on any host.
    let mem = create_guest_memory(cfg.memory_mib)?;
    let kernel = boot::load_kernel(&mem, &cfg.kernel)?;
    let initrd_max = match kernel.kind {
        KernelKind::BzImage { header, .. } if header.initrd_addr_max != 0 => {
            u64::from(header.initrd_addr_max)
        }
        _ => u64::MAX,
    };
    let initrd =
        cfg.initramfs.as_ref().map(|p| boot::load_initrd(&mem, p, kernel.end, initrd_max)).transpose()?;

    let vm = Vm::new(cfg.vcpus)?;
    vm.register_memory(&mem)?;
    vm.setup_irqchip()?;

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
            let dev = Arc::new(Mutex::new(SerialConsole::new(irq, out).map_err(io_err("serial"))?));
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
        let tap = crate::devices::virtio::net::tap::Tap::open(&n.tap)?;
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
    if let Some(j) = jail {
        j.enter()?;
    }
    let mut placer = VirtioPlacer { next: 0, acpi: Vec::new() };
    for dev in devices {
        placer.add(&vm, &mem, &mut mmio, dev)?;
    }
    if let (Some(l), Some(v)) = (listener, &cfg.vsock) {
        crate::loopback_forward::start(l, v.uds_path.clone())
            .map_err(|source| BuildError::Io { what: "loopback forward thread", source })?;
    }

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
    Ok(Vmm::new(vm, mem, vcpus, pio, mmio, exit, serial, cfg.serial == SerialConfig::Stdio))
}
