//! A minimal hardware-reduced ACPI platform: RSDP → XSDT → {FADT → DSDT, MADT}.
//!
//! It gives the guest: every vCPU (MADT local APICs plus one IOAPIC), poweroff (the FADT sleep
//! control register plus `\_S5` in the DSDT), panic reporting (a pvpanic `QEMU0001` device),
//! the devices themselves (COM1 as `PNP0501`, virtio-mmio as `LNRO0005`), and the VM generation
//! id (`VMGENCTR`) with the Generic Event Device (`ACPI0013`) that notifies it. Hardware-reduced
//! mode tells Linux there is no legacy PIC or PIT to set up, which shortens boot; it also means
//! Linux has no identity-mapped ISA IRQs, so a device's interrupt only exists once ACPI
//! describes it: `virtio_mmio.device=` command-line devices could not request their IRQ.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{ACPI_START, IOAPIC_ADDR, LAPIC_ADDR, VMGENID_ADDR};
use crate::devices::legacy::{pvpanic, sleep_ctl};

const OEM_ID: [u8; 6] = *b"HUSK  ";
const OEM_TABLE_ID: [u8; 8] = *b"HUSKVM  ";
const OEM_REVISION: u32 = 1;
/// FADT IAPC_BOOT_ARCH: no VGA, no CMOS RTC (kvmclock gives the wall clock).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {0} bytes, more than the space reserved for them")]
    TooLarge(u64),
    #[error("writing ACPI tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("{0} vCPUs do not fit 8-bit APIC IDs")]
    TooManyCpus(u32),
}

/// A device the DSDT describes, with the GSI it interrupts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiDevice {
    /// A 16550 UART at an I/O port range.
    Serial { port: u16, len: u8, gsi: u32 },
    /// A virtio-mmio transport window.
    VirtioMmio { base: u32, len: u32, gsi: u32 },
    /// The VM generation id buffer at `addr`, and the Generic Event Device whose interrupt on
    /// `gsi` notifies it.
    VmGenId { addr: u64, gsi: u32 },
}

/// Device notification "the generation id may have changed" (ACPI's first device-specific one).
const VMGENID_NOTIFY: u8 = 0x80;

/// `VGEN`: the id's address, which Linux's vmgenid driver maps, split as the spec wants (a
/// package of the low and high 32 bits, returned by the `ADDR` method). `GED0`: one
/// edge-triggered interrupt whose `_EVT` (called with the GSI) notifies `VGEN`.
fn vmgenid_aml(addr: u64, gsi: u32, out: &mut Vec<u8>) {
    let (lo, hi) = (addr as u32, (addr >> 32) as u32);
    let addr_pkg = aml::Package::new(vec![&lo, &hi]);
    aml::Device::new(
        "VGEN".into(),
        vec![
            &aml::Name::new("_HID".into(), &"VMGENCTR"),
            &aml::Name::new("_CID".into(), &"VM_GEN_COUNTER"),
            &aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &aml::Method::new("ADDR".into(), 0, false, vec![&aml::Return::new(&addr_pkg)]),
        ],
    )
    .to_aml_bytes(out);
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let vgen = aml::Path::new("\\_SB_.VGEN");
    let notify = aml::Notify::new(&vgen, &VMGENID_NOTIFY);
    let is_ours = aml::Equal::new(&aml::Arg(0), &gsi);
    aml::Device::new(
        "GED0".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &0u32),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Method::new("_EVT".into(), 1, true, vec![&aml::If::new(&is_ours, vec![&notify])]),
        ],
    )
    .to_aml_bytes(out);
}

fn device_aml(dev: &AcpiDevice, index: usize, out: &mut Vec<u8>) {
    // Edge-triggered, active-high, exclusive: what irqfd delivers.
    match *dev {
        AcpiDevice::VmGenId { addr, gsi } => vmgenid_aml(addr, gsi, out),
        AcpiDevice::Serial { port, len, gsi } => {
            let io = aml::IO::new(port, port, 1, len);
            let irq = aml::Interrupt::new(true, true, false, false, gsi);
            let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
            let hid = aml::EISAName::new("PNP0501");
            let uid = index as u32;
            let name = format!("COM{index}");
            aml::Device::new(
                name.as_str().into(),
                vec![
                    &aml::Name::new("_HID".into(), &hid),
                    &aml::Name::new("_UID".into(), &uid),
                    &aml::Name::new("_CRS".into(), &crs),
                ],
            )
            .to_aml_bytes(out);
        }
        AcpiDevice::VirtioMmio { base, len, gsi } => {
            let mem = aml::Memory32Fixed::new(true, base, len);
            let irq = aml::Interrupt::new(true, true, false, false, gsi);
            let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
            let uid = index as u32;
            let name = format!("V{index:03X}");
            aml::Device::new(
                name.as_str().into(),
                vec![
                    &aml::Name::new("_HID".into(), &"LNRO0005"),
                    &aml::Name::new("_UID".into(), &uid),
                    &aml::Name::new("_CRS".into(), &crs),
                ],
            )
            .to_aml_bytes(out);
        }
    }
}

fn dsdt(devices: &[AcpiDevice]) -> Vec<u8> {
    let mut body = Vec::new();
    // Sleep type for S5; the sleep control register device matches this value.
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&sleep_ctl::S5_SLEEP_TYPE]))
        .to_aml_bytes(&mut body);
    let port = pvpanic::PORT as u16;
    let io = aml::IO::new(port, port, 1, pvpanic::PORT_LEN as u8);
    let crs = aml::ResourceTemplate::new(vec![&io]);
    let mut sb = Vec::new();
    aml::Device::new(
        "PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Name::new("_STA".into(), &0x0fu8),
        ],
    )
    .to_aml_bytes(&mut sb);
    let (mut serial, mut virtio, mut other) = (0, 0, 0);
    for dev in devices {
        let index = match dev {
            AcpiDevice::Serial { .. } => &mut serial,
            AcpiDevice::VirtioMmio { .. } => &mut virtio,
            AcpiDevice::VmGenId { .. } => &mut other,
        };
        device_aml(dev, *index, &mut sb);
        *index += 1;
    }
    aml::Scope::new("\\_SB_".into(), vec![&RawAml(&sb)]).to_aml_bytes(&mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// Already-encoded AML, so device objects built in a loop can go into one scope.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_reg = |port: u64| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port);
    let mut b =
        FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION).dsdt_64(dsdt_addr).flag(Flags::HwReducedAcpi);
    b.sleep_control_reg = io_reg(sleep_ctl::PORT);
    b.sleep_status_reg = io_reg(sleep_ctl::PORT + 1);
    b.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

fn madt(vcpus: u32) -> Result<Vec<u8>, AcpiError> {
    if vcpus > crate::config::MAX_VCPUS {
        return Err(AcpiError::TooManyCpus(vcpus));
    }
    let mut madt =
        MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(LAPIC_ADDR as u32));
    for cpu in 0..vcpus {
        let id = u8::try_from(cpu).ok().filter(|&i| i != 0xff).ok_or(AcpiError::TooManyCpus(vcpus))?;
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // The IOAPIC ID follows the CPUs' so IDs stay unique.
    let ioapic_id = u8::try_from(vcpus).map_err(|_| AcpiError::TooManyCpus(vcpus))?;
    madt.add_structure(IoApic::new(ioapic_id, IOAPIC_ADDR as u32, 0));
    let mut out = Vec::new();
    madt.to_aml_bytes(&mut out);
    Ok(out)
}

fn align16(v: u64) -> u64 {
    (v + 15) & !15
}

/// Builds the tables and writes them at `ACPI_START`; returns the RSDP address for the boot
/// protocol (PVH start_info or boot_params), and where the tables end.
pub fn write_acpi_tables<M: GuestMemory>(
    mem: &M,
    vcpus: u32,
    devices: &[AcpiDevice],
) -> Result<(u64, u64), AcpiError> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    // XSDT: header + one pointer per table.
    let fadt_addr = align16(xsdt_addr + 36 + 2 * 8);
    let dsdt_addr = align16(fadt_addr + FADTBuilder::default_len());
    let dsdt = dsdt(devices);
    let madt_addr = align16(dsdt_addr + dsdt.len() as u64);
    let madt = madt(vcpus)?;
    let end = madt_addr + madt.len() as u64;
    // The VMGenID buffer follows the tables in the same reserved region.
    if end > VMGENID_ADDR {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }
    let fadt = fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp_bytes);

    for (addr, bytes) in [
        (rsdp_addr, &rsdp_bytes),
        (xsdt_addr, &xsdt_bytes),
        (fadt_addr, &fadt),
        (dsdt_addr, &dsdt),
        (madt_addr, &madt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))?;
    }
    Ok((rsdp_addr, end))
}

/// The FADT size, which the crate exposes only through `FADT::len`.
trait FadtLen {
    fn default_len() -> u64;
}

impl FadtLen for FADTBuilder {
    fn default_len() -> u64 {
        acpi_tables::fadt::FADT::len() as u64
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn table_at(m: &GuestMemoryMmap<()>, addr: u64) -> Vec<u8> {
        let len: u32 = m.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut b = vec![0u8; len as usize];
        m.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    fn devs() -> Vec<AcpiDevice> {
        vec![
            AcpiDevice::Serial { port: 0x3f8, len: 8, gsi: 4 },
            AcpiDevice::VirtioMmio { base: 0xd000_0000, len: 0x1000, gsi: 5 },
        ]
    }

    #[test]
    fn tables_link_and_checksum() {
        let m: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let (rsdp, end) = write_acpi_tables(&m, 2, &devs()).unwrap();
        assert!(end <= VMGENID_ADDR);
        let mut r = [0u8; 36];
        m.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xsdt = table_at(&m, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let ptrs: Vec<u64> =
            xsdt[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        let fadt = table_at(&m, ptrs[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        // Sleep control register GAS at offset 244: system I/O at the device's port.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64::from_le_bytes(fadt[248..256].try_into().unwrap()), sleep_ctl::PORT);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&m, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(8).any(|w| w == b"QEMU0001"));
        assert!(dsdt.windows(8).any(|w| w == b"LNRO0005"));
        assert!(dsdt.windows(4).any(|w| w == b"COM0") && dsdt.windows(4).any(|w| w == b"V000"));
        // The virtio window's base address appears in its Memory32Fixed descriptor.
        assert!(dsdt.windows(4).any(|w| w == 0xd000_0000u32.to_le_bytes()));
        let madt = table_at(&m, ptrs[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Two local APIC entries (type 0, length 8) then the IOAPIC (type 1).
        assert_eq!(&madt[44..46], &[0, 8]);
        assert_eq!(madt[47], 0);
        assert_eq!(&madt[52..54], &[0, 8]);
        assert_eq!(madt[55], 1);
        assert_eq!(madt[60], 1);
    }

    fn dsdt_of(m: &GuestMemoryMmap<()>, rsdp: u64) -> Vec<u8> {
        let xsdt: u64 = m.read_obj(GuestAddress(rsdp + 24)).unwrap();
        let fadt: u64 = m.read_obj(GuestAddress(xsdt + 36)).unwrap();
        let dsdt: u64 = m.read_obj(GuestAddress(fadt + 140)).unwrap();
        table_at(m, dsdt)
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    /// What `VGEN.ADDR` returns, decoded from its AML: Method flags 0, Return, a two-element
    /// package of integers (low and high halves).
    fn vgen_addr(dsdt: &[u8]) -> u64 {
        let at = find(dsdt, b"ADDR").expect("ADDR method") + 4;
        let b = &dsdt[at..];
        assert_eq!(&b[..3], &[0x00, 0xa4, 0x12], "ADDR: no args, returns a package");
        assert_eq!(b[4], 2, "two elements");
        let mut rest = &b[5..];
        let mut int = || -> u64 {
            let (v, n) = match rest[0] {
                0x00 => (0, 1),
                0x01 => (1, 1),
                0x0a => (u64::from(rest[1]), 2),
                0x0b => (u64::from(u16::from_le_bytes([rest[1], rest[2]])), 3),
                0x0c => (u64::from(u32::from_le_bytes(rest[1..5].try_into().unwrap())), 5),
                op => panic!("unexpected opcode {op:#x}"),
            };
            rest = &rest[n..];
            v
        };
        let lo = int();
        lo | (int() << 32)
    }

    #[test]
    fn vmgenid_and_ged_are_described_and_the_id_lands_where_addr_points() {
        let m: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mut devices = devs();
        devices.push(AcpiDevice::VmGenId { addr: VMGENID_ADDR, gsi: 3 });
        let (rsdp, end) = write_acpi_tables(&m, 1, &devices).unwrap();
        assert!(end <= VMGENID_ADDR);
        let dsdt = dsdt_of(&m, rsdp);
        assert!(checksum_ok(&dsdt));
        for needle in [&b"VMGENCTR"[..], b"VM_GEN_COUNTER", b"ACPI0013", b"VGEN", b"GED0", b"_EVT"] {
            assert!(find(&dsdt, needle).is_some(), "{}", String::from_utf8_lossy(needle));
        }
        // GED0's _CRS: one extended interrupt, consumer + edge + active-high + exclusive, GSI 3.
        assert!(find(&dsdt, &[0x89, 0x06, 0x00, 0x03, 0x01, 3, 0, 0, 0]).is_some());
        // _EVT (1 arg, serialized): If (Arg0 == 3) { Notify (\_SB.VGEN, 0x80) }.
        let evt = find(&dsdt, b"_EVT").unwrap() + 4;
        assert_eq!(dsdt[evt], 0x09);
        let body = &dsdt[evt + 1..];
        assert_eq!(body[0], 0xa0, "If");
        let cond = &body[2..];
        assert_eq!(&cond[..4], &[0x93, 0x68, 0x0a, 3], "LEqual (Arg0, 3)");
        let notify = b"\x86\\._SB_VGEN\x0a\x80";
        assert_eq!(&cond[4..4 + notify.len()], notify, "Notify (\\_SB.VGEN, 0x80)");
        assert_eq!(usize::from(body[1]), 1 + 4 + notify.len(), "the If holds only that");

        let id = crate::devices::vmgenid::random_id().unwrap();
        let irq = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        crate::devices::vmgenid::VmGenId::new(&m, irq, id).unwrap();
        let mut back = [0u8; 16];
        m.read_slice(&mut back, GuestAddress(vgen_addr(&dsdt))).unwrap();
        assert_eq!(back, id);
        // The tables are untouched by the id.
        assert_eq!(dsdt_of(&m, rsdp), dsdt);
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        let m: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        assert!(write_acpi_tables(&m, 254, &[]).is_ok());
        assert!(matches!(write_acpi_tables(&m, 255, &[]), Err(AcpiError::TooManyCpus(255))));
    }
}
