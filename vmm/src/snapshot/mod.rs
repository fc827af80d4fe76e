//! VM snapshots: a paused VM's whole state in a checksummed state file plus its RAM in a raw
//! memory file, and a VM started from them with that file mapped copy-on-write.
//!
//! A snapshot directory holds `state` (see [`file`]) and `memory` (guest RAM, regions one
//! after another at the offsets the state records; pages that were all zero are holes).
//! Saving is driven over the control socket (see [`control`]); restoring is
//! `husk-vmm --restore DIR` with the same VM configuration (paths of shares and sockets may
//! differ: they are the new sandbox's).
//!
//! Everything read back is treated as hostile: the header and checksums first, then the
//! shape against the configuration, then every device and queue value against what the
//! device offers and the guest memory holds; KVM checks the CPU state it is given.

pub mod busy_chunks;
pub mod control;
pub mod file;
pub mod huge_pages;
pub mod kvm_state;
pub mod memory;
pub mod state;
pub mod working_set;

use std::path::PathBuf;

pub use state::{DeviceIdentity, Identity, Snapshot, TransportState};

/// Name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Name of the guest memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot is truncated: {found} of {expected} bytes")]
    Truncated { expected: u64, found: u64 },
    #[error("not a husk-vmm snapshot (bad magic)")]
    NotASnapshot,
    #[error("snapshot format version {found} is not the supported version {supported}")]
    Version { found: u32, supported: u32 },
    #[error("snapshot is corrupt: {0}")]
    Corrupt(String),
    #[error("encoding the snapshot: {0}")]
    Encode(String),
    #[error("snapshot was made for a different VM: {0}")]
    Mismatch(String),
    #[error("snapshot holds invalid device state: {0}")]
    Invalid(String),
    #[error("cannot snapshot now: {0}")]
    Refused(String),
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// How a VMM takes part in snapshots, and whom it hands its VM to; all off by default. Kept
/// out of [`crate::VmConfig`] so the sandbox configuration stays what it is; the CLI sets
/// these from its own flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Unix socket that takes control commands (`snapshot`), bound before the jail.
    pub control: Option<PathBuf>,
    /// Existing directory the `snapshot` command writes into (opened before the jail).
    pub snapshot_dir: Option<PathBuf>,
    /// Start from this snapshot directory instead of booting the kernel.
    pub restore: Option<PathBuf>,
    /// The caller's identity of kernel, initramfs and command line, recorded in and checked
    /// against snapshots.
    pub image_id: Option<String>,
    /// On restore, how many of the busiest 2 MiB chunks of guest memory to copy into private
    /// 2 MiB pages (see [`busy_chunks`]); None is the default, [`busy_chunks::DEFAULT_CHUNKS`].
    pub private_chunks: Option<usize>,
    /// An inherited Unix socket the VMM sends a duplicate of its KVM VM descriptor over, once
    /// the VM is made (see [`crate::handover`]).
    pub vm_handover: Option<std::os::fd::RawFd>,
}

impl Identity {
    /// Says how `self` (the snapshot's) differs from `want` (this VMM's), if at all.
    pub fn check(&self, want: &Identity) -> Result<(), SnapshotError> {
        let differ = |what: &str, have: String, want: String| {
            Err(SnapshotError::Mismatch(format!("{what}: snapshot has {have}, this VM has {want}")))
        };
        if self.memory_mib != want.memory_mib {
            return differ("memory", format!("{} MiB", self.memory_mib), format!("{} MiB", want.memory_mib));
        }
        if self.vcpus != want.vcpus {
            return differ("vCPUs", self.vcpus.to_string(), want.vcpus.to_string());
        }
        if self.image_id != want.image_id {
            return differ("image id", format!("{:?}", self.image_id), format!("{:?}", want.image_id));
        }
        if self.kernel_len != want.kernel_len {
            return differ(
                "kernel",
                format!("{} bytes", self.kernel_len),
                format!("{} bytes (another kernel)", want.kernel_len),
            );
        }
        if self.initramfs_len != want.initramfs_len {
            return differ(
                "initramfs size",
                format!("{:?}", self.initramfs_len),
                format!("{:?}", want.initramfs_len),
            );
        }
        if self.serial != want.serial {
            return differ("serial console", self.serial.to_string(), want.serial.to_string());
        }
        if self.devices.len() != want.devices.len() {
            return differ("virtio devices", self.devices.len().to_string(), want.devices.len().to_string());
        }
        // Config space without its zero tail: a MAC, CID or tag reads at a glance.
        let show = |d: &DeviceIdentity| {
            let end = d.config.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            format!("type {} features {:#x} config {:02x?}", d.device_type, d.features, &d.config[..end])
        };
        for (i, (have, want)) in self.devices.iter().zip(&want.devices).enumerate() {
            if have != want {
                return differ(&format!("virtio device {i}"), show(have), show(want));
            }
        }
        Ok(())
    }
}

/// A fresh 128-bit VM generation id (ACPI VMGenID): a restored sibling must look like a new
/// VM to the guest's RNG. See [`crate::devices::vmgenid`].
pub use crate::devices::vmgenid::random_id as new_generation_id;

#[cfg(test)]
pub(crate) mod tests {
    use super::state::*;

    pub(crate) fn sample_snapshot() -> Snapshot {
        let regs = kvm_bindings::kvm_regs { rip: 0xffff_ffff_8100_0000, ..Default::default() };
        let clock = kvm_bindings::kvm_clock_data { clock: 123_456_789, ..Default::default() };
        let vcpu = VcpuState {
            cpuid: vec![Default::default(); 3],
            msrs: (0..40)
                .map(|i| kvm_bindings::kvm_msr_entry {
                    index: i,
                    data: u64::from(i) * 7,
                    ..Default::default()
                })
                .collect(),
            regs,
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            mp_state: Default::default(),
            events: Default::default(),
            tsc_khz: Some(2_000_000),
        };
        Snapshot {
            identity: Identity {
                memory_mib: 128,
                vcpus: 1,
                image_id: Some("img".into()),
                kernel_len: 1000,
                initramfs_len: None,
                serial: true,
                devices: vec![DeviceIdentity {
                    device_type: 4,
                    features: 1 << 32,
                    queue_max_sizes: vec![256],
                    config: vec![],
                }],
            },
            memory: vec![MemRegion { guest_addr: 0, len: 128 << 20, file_offset: 0 }],
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock,
            },
            vcpus: vec![vcpu],
            devices: vec![TransportState {
                device_type: 4,
                status: 15,
                device_features_sel: 0,
                driver_features_sel: 1,
                acked_features: 1 << 32,
                queue_sel: 0,
                config_generation: 0,
                interrupt_status: 0,
                activated: true,
                queues: vec![QueueSnap {
                    max_size: 256,
                    size: 256,
                    ready: true,
                    desc_table: 0x1000,
                    avail_ring: 0x2000,
                    used_ring: 0x3000,
                    next_avail: 5,
                    next_used: 5,
                    event_idx: false,
                }],
            }],
            serial: None,
            vmgenid: crate::devices::vmgenid::VmGenIdState {
                addr: crate::arch::layout::VMGENID_ADDR,
                gsi: crate::arch::layout::GED_GSI,
                generation: [7; 16],
            },
        }
    }

    #[test]
    fn identity_mismatches_are_named() {
        let a = sample_snapshot().identity;
        assert!(a.check(&a).is_ok());
        type Change = Box<dyn Fn(&mut Identity)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|i| i.memory_mib = 256), "memory: snapshot has 128 MiB, this VM has 256 MiB"),
            (Box::new(|i| i.vcpus = 2), "vCPUs"),
            (Box::new(|i| i.kernel_len = 999), "another kernel"),
            (Box::new(|i| i.image_id = None), "image id"),
            (Box::new(|i| i.initramfs_len = Some(1)), "initramfs"),
            (Box::new(|i| i.devices.clear()), "virtio devices"),
            (Box::new(|i| i.devices[0].config = vec![1]), "virtio device 0"),
        ];
        for (change, needle) in cases {
            let mut b = a.clone();
            change(&mut b);
            let err = a.check(&b).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
