//! VM generation ID (Microsoft's "Virtual Machine Generation ID", Linux's `vmgenid` driver): a
//! 128-bit id in guest memory that changes whenever the VM may have been duplicated, so the
//! guest reseeds its RNG instead of handing the same "random" bytes to every sibling restored
//! from one snapshot.
//!
//! The id sits at a fixed address in the E820-reserved ACPI region (never guest RAM); the DSDT
//! describes it (`VMGENCTR`, whose `ADDR` method returns that address) and a Generic Event
//! Device whose interrupt makes the guest re-read it (see `arch::acpi`). The device has no
//! registers: the VMM writes a new id, then raises the GED's edge interrupt through an irqfd.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{GED_GSI, VMGENID_ADDR};
use crate::snapshot::SnapshotError;

/// Bytes in a generation id.
pub const ID_LEN: usize = 16;

pub type GenerationId = [u8; ID_LEN];

#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("VMGenID buffer in guest memory: {0}")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("raising the VMGenID notification interrupt: {0}")]
    Interrupt(#[source] std::io::Error),
    #[error("no randomness for a VM generation id: {0}")]
    Random(#[source] std::io::Error),
}

/// What a snapshot records of the device: where the guest was told the id is, the interrupt
/// it listens on (both baked into the DSDT in the saved memory) and the id it last read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGenIdState {
    pub addr: u64,
    pub gsi: u32,
    pub generation: GenerationId,
}

impl VmGenIdState {
    /// A saved state comes from a file: it must describe exactly the device this VMM builds,
    /// since the guest's tables (in the saved memory) point there.
    pub fn check(&self) -> Result<(), SnapshotError> {
        if self.addr != VMGENID_ADDR || self.gsi != GED_GSI {
            return Err(SnapshotError::Invalid(format!(
                "VMGenID at {:#x} on GSI {}, this VMM places it at {VMGENID_ADDR:#x} on GSI {GED_GSI}",
                self.addr, self.gsi
            )));
        }
        Ok(())
    }
}

/// A fresh random id from the host kernel's RNG.
pub fn random_id() -> Result<GenerationId, VmGenIdError> {
    let mut id = [0u8; ID_LEN];
    let mut got = 0;
    while got < ID_LEN {
        // SAFETY: getrandom writes at most `ID_LEN - got` bytes at `id[got..]`, inside `id`.
        let n = unsafe { libc::getrandom(id[got..].as_mut_ptr().cast(), ID_LEN - got, 0) };
        match n {
            n if n > 0 => got += n as usize,
            _ => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(VmGenIdError::Random(err));
                }
            }
        }
    }
    Ok(id)
}

/// A new id for a restored VM: random, and never the one the guest already holds (the driver
/// ignores a notification whose id did not change; 2^-128 odds, but a fixed id would be fatal).
pub fn next_id(previous: &GenerationId) -> Result<GenerationId, VmGenIdError> {
    let id = random_id()?;
    if id != *previous {
        return Ok(id);
    }
    random_id()
}

/// The id as 32 lowercase hex digits.
pub fn hex(id: &GenerationId) -> String {
    id.iter().fold(String::with_capacity(2 * ID_LEN), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The device: its notification interrupt and the id it currently presents.
#[derive(Debug)]
pub struct VmGenId {
    irq: EventFd,
    generation: GenerationId,
    /// Whether the id is news to the guest (a restore): announced once the vCPUs run.
    announce: bool,
}

impl VmGenId {
    /// Writes `generation` into guest memory; `irq` must already be the GED GSI's irqfd.
    pub fn new<M: GuestMemory>(
        mem: &M,
        irq: EventFd,
        generation: GenerationId,
    ) -> Result<Self, VmGenIdError> {
        mem.write_slice(&generation, GuestAddress(VMGENID_ADDR)).map_err(VmGenIdError::Memory)?;
        Ok(Self { irq, generation, announce: false })
    }

    /// Marks the id as new to a guest that already read another (a restored VM).
    pub fn announce_on_start(mut self) -> Self {
        self.announce = true;
        self
    }

    /// Called once the vCPUs run: notifies the guest if its id changed under it.
    pub fn start(&self) -> Result<(), VmGenIdError> {
        if self.announce {
            self.notify()?;
        }
        Ok(())
    }

    pub fn generation(&self) -> &GenerationId {
        &self.generation
    }

    /// Raises the GED interrupt, whose `_EVT` notifies the VMGenID device: the guest re-reads
    /// the id and, as it changed, reseeds.
    pub fn notify(&self) -> Result<(), VmGenIdError> {
        self.irq.write(1).map_err(VmGenIdError::Interrupt)
    }
}

/// The device state to save: the id is read back from guest memory, where the guest sees it.
pub fn save<M: GuestMemory>(mem: &M) -> Result<VmGenIdState, VmGenIdError> {
    let mut generation = [0u8; ID_LEN];
    mem.read_slice(&mut generation, GuestAddress(VMGENID_ADDR)).map_err(VmGenIdError::Memory)?;
    Ok(VmGenIdState { addr: VMGENID_ADDR, gsi: GED_GSI, generation })
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    #[test]
    fn id_lands_at_its_address_and_notify_raises_the_interrupt() {
        let m = mem();
        let id = random_id().unwrap();
        let dev = VmGenId::new(&m, EventFd::new(EFD_NONBLOCK).unwrap(), id).unwrap();
        let mut back = [0u8; ID_LEN];
        m.read_slice(&mut back, GuestAddress(VMGENID_ADDR)).unwrap();
        assert_eq!(back, id);
        assert_eq!(save(&m).unwrap(), VmGenIdState { addr: VMGENID_ADDR, gsi: GED_GSI, generation: id });
        dev.notify().unwrap();
        assert_eq!(dev.irq.read().unwrap(), 1);
    }

    #[test]
    fn restores_get_distinct_new_ids() {
        let saved = random_id().unwrap();
        let (a, b) = (next_id(&saved).unwrap(), next_id(&saved).unwrap());
        assert!(a != saved && b != saved && a != b);
        assert_eq!(hex(&[0xab; ID_LEN]), "ab".repeat(ID_LEN));
    }

    #[test]
    fn saved_state_is_checked() {
        let good = VmGenIdState { addr: VMGENID_ADDR, gsi: GED_GSI, generation: [1; ID_LEN] };
        assert!(good.check().is_ok());
        for bad in [
            VmGenIdState { addr: 0x1000, ..good },
            VmGenIdState { addr: u64::MAX, ..good },
            VmGenIdState { gsi: 99, ..good },
        ] {
            let err = bad.check().unwrap_err().to_string();
            assert!(err.contains("VMGenID"), "{err}");
        }
    }

    #[test]
    fn memory_outside_the_guest_is_an_error() {
        let small: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(VmGenId::new(&small, EventFd::new(EFD_NONBLOCK).unwrap(), [1; ID_LEN]).is_err());
        assert!(save(&small).is_err());
    }
}
