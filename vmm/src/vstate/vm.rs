//! Opening KVM with messages a user can act on, and VM-wide setup.

use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemory, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::KVM_TSS_ADDR;
use crate::memory::GuestMem;

/// Overrides the KVM device path (tests use it to show the missing-device error).
pub const KVM_DEVICE_ENV: &str = "HUSK_KVM_DEVICE";
const KVM_API_VERSION: i32 = 12;

/// Capabilities the VMM cannot work without.
const REQUIRED_CAPS: [(Cap, &str); 6] = [
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Pit2, "in-kernel PIT"),
];

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{} does not exist: KVM is not available on this host (enable virtualization and load kvm_intel or kvm_amd)", .0.display())]
    KvmMissing(PathBuf),
    #[error("permission denied opening {}: run as root or join the group that owns it (usually `kvm`)", .0.display())]
    KvmPermission(PathBuf),
    #[error("cannot open {}: {source}", path.display())]
    KvmOpen { path: PathBuf, source: kvm_ioctls::Error },
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("{vcpus} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyVcpus { vcpus: u32, max: usize },
    #[error("KVM {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("the thread creating the VM ended without a VM")]
    CreateThread,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    pub fn kvm_path() -> PathBuf {
        std::env::var_os(KVM_DEVICE_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/dev/kvm"))
    }

    pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
        use std::os::unix::ffi::OsStrExt;
        let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| VmError::KvmMissing(path.to_path_buf()))?;
        let kvm = Kvm::new_with_path(cpath).map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::KvmMissing(path.to_path_buf()),
            libc::EACCES | libc::EPERM => VmError::KvmPermission(path.to_path_buf()),
            _ => VmError::KvmOpen { path: path.to_path_buf(), source: e },
        })?;
        if kvm.get_api_version() != KVM_API_VERSION {
            return Err(VmError::ApiVersion(kvm.get_api_version()));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        Ok(kvm)
    }

    /// Opens KVM and creates the VM, checking the vCPU count against what this host allows.
    pub fn new(vcpus: u32) -> Result<Self, VmError> {
        let kvm = Self::open_kvm(&Self::kvm_path())?;
        let max = kvm.get_max_vcpus();
        if vcpus as usize > max {
            return Err(VmError::TooManyVcpus { vcpus, max });
        }
        let fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
        Ok(Self { kvm, fd })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The KVM system and VM descriptors (for a jail that closes everything else).
    pub fn raw_fds(&self) -> [std::os::fd::RawFd; 2] {
        use std::os::fd::AsRawFd;
        [self.kvm.as_raw_fd(), self.fd.as_raw_fd()]
    }

    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("get supported CPUID"))
    }

    /// The MSRs KVM can save and restore for a vCPU (a system ioctl: asked during set-up).
    pub fn msr_index_list(&self) -> Result<Vec<u32>, VmError> {
        Ok(self.kvm.get_msr_index_list().map_err(kvm_err("get MSR index list"))?.as_slice().to_vec())
    }

    pub fn register_memory(&self, mem: &GuestMem) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping lives in `mem`, which outlives the VM (the Vmm owns both and
            // drops the VM first).
            unsafe { self.fd.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
        }
        Ok(())
    }

    /// In-kernel LAPICs/IOAPIC/PIC and PIT; must precede vCPU creation.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd.set_tss_address(KVM_TSS_ADDR as usize).map_err(kvm_err("set TSS address"))?;
        self.fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(pit).map_err(kvm_err("create PIT"))?;
        Ok(())
    }

    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(kvm_err("register irqfd"))
    }

    /// A 32-bit write of `datamatch` to `addr` signals `evt` inside KVM, without a VM exit to us.
    pub fn register_mmio_ioevent(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("register ioeventfd"))
    }
}
