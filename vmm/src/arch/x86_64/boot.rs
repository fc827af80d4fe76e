//! Loading the kernel and initramfs, and the boot information the kernel reads first: the PVH
//! start_info (ELF vmlinux) or the zero page (bzImage), each with the same e820 memory map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};

use super::layout::*;
use super::regs::BootEntry;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const PVH_MODLIST_START: u64 = PVH_INFO_START + 0x40;
const PVH_MEMMAP_START: u64 = PVH_INFO_START + 0x80;
const PVH_MEMMAP_MAX: usize = 16;
/// Boot protocol constants for the zero page.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const LOADFLAG_CAN_USE_HEAP: u8 = 0x80;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {0}: {1}")]
    ReadKernel(String, std::io::Error),
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat(String),
    #[error("ELF kernel {0} has no PVH entry point (build it with CONFIG_PVH=y) or is not a 64-bit x86 ELF")]
    NoPvhEntry(String),
    #[error("kernel {path} is corrupt or truncated: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("guest memory ({mem_mib} MiB) is too small for the kernel, which needs at least {need_mib} MiB")]
    KernelTooBig { mem_mib: u64, need_mib: u64 },
    #[error(
        "initramfs ({size_mib} MiB) does not fit in guest memory after the kernel; give the VM more memory"
    )]
    InitrdTooBig { size_mib: u64 },
    #[error("cannot read initramfs {0}: {1}")]
    ReadInitrd(String, std::io::Error),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// One e820 / PVH memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's memory map: low RAM, the reserved legacy/ACPI area, RAM up to the MMIO hole, and
/// any RAM above 4 GiB.
pub fn e820_map<M: GuestMemory>(mem: &M) -> Vec<MemoryRegion> {
    let mut map = vec![
        MemoryRegion { addr: 0, size: EBDA_START, kind: E820_RAM },
        MemoryRegion { addr: EBDA_START, size: HIMEM_START - EBDA_START, kind: E820_RESERVED },
    ];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let end = start + region.len();
        // The first region also covers [0, 1 MiB), described above.
        let start = start.max(HIMEM_START);
        if end > start {
            map.push(MemoryRegion { addr: start, size: end - start, kind: E820_RAM });
        }
    }
    map
}

/// Where the kernel expects what, after loading.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub kind: KernelKind,
    pub end: u64,
}

#[derive(Debug, Clone, Copy)]
pub enum KernelKind {
    Pvh { entry: u64 },
    BzImage { load_addr: u64, header: setup_header },
}

/// End of low RAM (below the MMIO hole): the initramfs goes at its top.
fn low_ram_end<M: GuestMemory>(mem: &M) -> u64 {
    mem.iter().map(|r| r.start_addr().0 + r.len()).filter(|&e| e <= MMIO_HOLE_START).max().unwrap_or(0)
}

fn mib_ceil(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

fn read_at(f: &mut File, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(buf)
}

/// Highest physical address the ELF's loadable segments reach, read from the program headers
/// alone (the image itself is copied straight into guest memory later, never into our heap).
fn elf_load_end(f: &mut File, path: &str) -> Result<u64, BootError> {
    let corrupt = |reason: &str| BootError::Corrupt { path: path.to_string(), reason: reason.to_string() };
    let file_len = f.metadata().map_err(|e| BootError::ReadKernel(path.into(), e))?.len();
    let mut ehdr = [0u8; 64];
    read_at(f, 0, &mut ehdr).map_err(|_| corrupt("ELF header is truncated"))?;
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(BootError::NoPvhEntry(path.into()));
    }
    let phoff = u64::from_le_bytes(ehdr[0x20..0x28].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([ehdr[0x36], ehdr[0x37]]) as u64;
    let phnum = u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]) as u64;
    if phentsize < 56 || phnum == 0 {
        return Err(corrupt("no program headers"));
    }
    let table_end = phnum.checked_mul(phentsize).and_then(|n| n.checked_add(phoff));
    if table_end.is_none_or(|e| e > file_len) {
        return Err(corrupt("program headers lie beyond the end of the file"));
    }
    let mut end = 0u64;
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        read_at(f, phoff + i * phentsize, &mut ph).map_err(|_| corrupt("program header unreadable"))?;
        let field = |o: usize| u64::from_le_bytes(ph[o..o + 8].try_into().unwrap_or_default());
        let p_type = u32::from_le_bytes(ph[0..4].try_into().unwrap_or_default());
        if p_type != 1 {
            continue; // PT_LOAD only
        }
        let (offset, paddr, filesz, memsz) = (field(8), field(0x18), field(0x20), field(0x28));
        if offset.checked_add(filesz).is_none_or(|e| e > file_len) {
            return Err(corrupt("a segment lies beyond the end of the file"));
        }
        let seg_end = paddr.checked_add(memsz).ok_or_else(|| corrupt("segment address overflows"))?;
        end = end.max(seg_end);
    }
    Ok(end)
}

/// Loads `path` into guest memory, detecting the format from its magic numbers.
pub fn load_kernel<M: GuestMemory>(mem: &M, path: &Path) -> Result<LoadedKernel, BootError> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(|e| BootError::ReadKernel(name.clone(), e))?;
    let mut magic = [0u8; 4];
    let mut hdrs = [0u8; 4];
    let is_elf = read_at(&mut f, 0, &mut magic).is_ok() && magic == *b"\x7fELF";
    let is_bz = read_at(&mut f, 0x202, &mut hdrs).is_ok() && u32::from_le_bytes(hdrs) == KERNEL_HDR_MAGIC;
    let mem_bytes: u64 = mem.iter().map(|r| r.len()).sum();
    let mem_mib = mem_bytes >> 20;
    let low_end = low_ram_end(mem);
    let corrupt =
        |e: linux_loader::loader::Error| BootError::Corrupt { path: name.clone(), reason: e.to_string() };
    if is_elf {
        let need = elf_load_end(&mut f, &name)?;
        if need > low_end {
            return Err(BootError::KernelTooBig { mem_mib, need_mib: mib_ceil(need) });
        }
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(corrupt)?;
        match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => {
                Ok(LoadedKernel { kind: KernelKind::Pvh { entry: entry.0 }, end: r.kernel_end })
            }
            _ => Err(BootError::NoPvhEntry(name)),
        }
    } else if is_bz {
        let mut hdr = [0u8; 4];
        // init_size (offset 0x260) is the memory the kernel needs from its load address on.
        read_at(&mut f, 0x260, &mut hdr).map_err(|e| BootError::ReadKernel(name.clone(), e))?;
        let need = HIMEM_START + u32::from_le_bytes(hdr) as u64;
        if need > low_end {
            return Err(BootError::KernelTooBig { mem_mib, need_mib: mib_ceil(need) });
        }
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(corrupt)?;
        let header = r.setup_header.ok_or_else(|| BootError::UnknownFormat(name.clone()))?;
        Ok(LoadedKernel {
            kind: KernelKind::BzImage { load_addr: r.kernel_load.0, header },
            end: need.max(r.kernel_end),
        })
    } else {
        Err(BootError::UnknownFormat(name))
    }
}

/// Copies the initramfs to the top of low RAM (page aligned); returns (address, size).
pub fn load_initrd<M: GuestMemory>(
    mem: &M,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(|e| BootError::ReadInitrd(name.clone(), e))?;
    let size = f.metadata().map_err(|e| BootError::ReadInitrd(name.clone(), e))?.len();
    let top = low_ram_end(mem).min(addr_max.saturating_add(1));
    let addr = top.checked_sub(size).map(|a| a & !0xfff).filter(|&a| a >= kernel_end);
    let addr = addr.ok_or(BootError::InitrdTooBig { size_mib: mib_ceil(size) })?;
    let count = usize::try_from(size).map_err(|_| BootError::InitrdTooBig { size_mib: mib_ceil(size) })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, count).map_err(|e| match e {
        vm_memory::GuestMemoryError::IOError(io) => BootError::ReadInitrd(name.clone(), io),
        other => BootError::Memory(other),
    })?;
    Ok((addr, size))
}

pub fn write_cmdline<M: GuestMemory>(mem: &M, text: &str) -> Result<(), BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline.insert_str(text).map_err(|e| BootError::Cmdline(e.to_string()))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))
}

// The boot structures come from linux-loader's generated bindings; these wrappers let
// vm-memory copy them (they are plain C structs without padding or pointers).
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: repr(transparent) over bindgen's repr(C) hvm_start_info, which is only u32/u64
// fields in an order that leaves no padding: every bit pattern is valid, and no pointers.
unsafe impl ByteValued for StartInfo {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: repr(transparent) over the repr(C) hvm_modlist_entry: four u64s, no padding, so
// every bit pattern is a valid value.
unsafe impl ByteValued for ModlistEntry {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: repr(transparent) over the repr(C) hvm_memmap_table_entry: two u64s then two u32s
// (24 bytes, no padding), so every bit pattern is a valid value.
unsafe impl ByteValued for MemmapEntry {}
#[derive(Clone, Copy)]
#[repr(transparent)]
struct ZeroPage(boot_params);
// SAFETY: repr(transparent) over the repr(C, packed) boot_params: explicit `_pad` arrays and
// nested integer-only structs that are packed or padding-free by layout, so no padding bytes,
// no pointers, and every bit pattern is a valid value.
unsafe impl ByteValued for ZeroPage {}

/// Writes the PVH start_info, module list and memory map; returns the vCPU entry.
pub fn write_pvh_info<M: GuestMemory>(
    mem: &M,
    entry: u64,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<BootEntry, BootError> {
    let map = e820_map(mem);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len().min(PVH_MEMMAP_MAX) as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry { paddr, size, ..Default::default() };
        mem.write_obj(ModlistEntry(module), GuestAddress(PVH_MODLIST_START))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    for (i, r) in map.iter().take(PVH_MEMMAP_MAX).enumerate() {
        let e = hvm_memmap_table_entry { addr: r.addr, size: r.size, type_: r.kind, reserved: 0 };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(MemmapEntry(e), GuestAddress(at))?;
    }
    mem.write_obj(StartInfo(info), GuestAddress(PVH_INFO_START))?;
    Ok(BootEntry::Pvh { entry, start_info: PVH_INFO_START })
}

/// Writes the zero page for the 64-bit Linux boot protocol; returns the vCPU entry.
pub fn write_zero_page<M: GuestMemory>(
    mem: &M,
    load_addr: u64,
    header: setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<BootEntry, BootError> {
    // SAFETY: boot_params is plain data; all-zero is its documented initial state.
    let mut params: boot_params = unsafe { std::mem::zeroed() };
    params.hdr = header;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.loadflags |= LOADFLAG_CAN_USE_HEAP;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    let map = e820_map(mem);
    for (slot, r) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr: r.addr, size: r.size, type_: r.kind };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(ZeroPage(params), GuestAddress(ZERO_PAGE_START))?;
    Ok(BootEntry::Linux64 { entry: load_addr + BZIMAGE_64BIT_ENTRY_OFFSET, zero_page: ZERO_PAGE_START })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::memory::create_guest_memory;

    fn tmp(name: &str, data: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("husk-boot-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(data).unwrap();
        p
    }

    #[test]
    fn e820_small_and_split_memory() {
        let m = create_guest_memory(128).unwrap();
        let map = e820_map(&m);
        assert_eq!(map[0], MemoryRegion { addr: 0, size: EBDA_START, kind: E820_RAM });
        assert_eq!(map[1].kind, E820_RESERVED);
        assert!(map[1].addr <= ACPI_START && map[1].addr + map[1].size >= ACPI_END);
        assert_eq!(
            map[2],
            MemoryRegion { addr: HIMEM_START, size: (128 << 20) - HIMEM_START, kind: E820_RAM }
        );
        let m = create_guest_memory(4096).unwrap();
        let map = e820_map(&m);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_HOLE_START);
        assert_eq!(map[3].addr, MMIO_HOLE_END);
        // No RAM entry overlaps another or the MMIO hole.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn pvh_start_info_layout() {
        let m = create_guest_memory(64).unwrap();
        let e = write_pvh_info(&m, 0x100_0000, Some((0x300_0000, 0x1234)), ACPI_START).unwrap();
        assert_eq!(e, BootEntry::Pvh { entry: 0x100_0000, start_info: PVH_INFO_START });
        let info: StartInfo = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        let info = info.0;
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!((info.cmdline_paddr, info.rsdp_paddr, info.nr_modules), (CMDLINE_START, ACPI_START, 1));
        assert_eq!(info.memmap_entries, 3);
        let module: ModlistEntry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.0.paddr, module.0.size), (0x300_0000, 0x1234));
        let last: MemmapEntry = m.read_obj(GuestAddress(info.memmap_paddr + 2 * 24)).unwrap();
        assert_eq!((last.0.addr, last.0.type_), (HIMEM_START, E820_RAM));
        // The structures must not overlap each other or the page tables.
        const { assert!(PVH_INFO_START + 56 <= PVH_MODLIST_START) };
        const { assert!(PVH_MEMMAP_START + (PVH_MEMMAP_MAX as u64) * 24 <= ZERO_PAGE_START) };
    }

    #[test]
    fn zero_page_fields() {
        let m = create_guest_memory(64).unwrap();
        let e =
            write_zero_page(&m, HIMEM_START, setup_header::default(), 30, Some((0x200_0000, 99)), ACPI_START)
                .unwrap();
        assert_eq!(e, BootEntry::Linux64 { entry: HIMEM_START + 0x200, zero_page: ZERO_PAGE_START });
        let zp: ZeroPage = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let p = zp.0;
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x200_0000);
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn cmdline_placement_and_limits() {
        let m = create_guest_memory(64).unwrap();
        write_cmdline(&m, "console=ttyS0 quiet").unwrap();
        let mut b = [0u8; 20];
        m.read_slice(&mut b, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&b, b"console=ttyS0 quiet\0");
        const { assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START) };
        assert!(write_cmdline(&m, &"x".repeat(CMDLINE_MAX_SIZE + 1)).is_err());
    }

    #[test]
    fn rejects_non_kernels() {
        let m = create_guest_memory(64).unwrap();
        let junk = tmp("junk", &[0x55; 4096]);
        assert!(matches!(load_kernel(&m, &junk), Err(BootError::UnknownFormat(_))));
        let short_elf = tmp("short-elf", b"\x7fELF\x02\x01\x01");
        assert!(matches!(load_kernel(&m, &short_elf), Err(BootError::Corrupt { .. })));
        let mut elf32 = vec![0u8; 64];
        elf32[..6].copy_from_slice(b"\x7fELF\x01\x01");
        let elf32 = tmp("elf32", &elf32);
        assert!(matches!(load_kernel(&m, &elf32), Err(BootError::NoPvhEntry(_))));
        let mut bz = vec![0u8; 0x1000];
        bz[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        bz[0x260..0x264].copy_from_slice(&(512u32 << 20).to_le_bytes());
        let bz = tmp("bz", &bz);
        let err = load_kernel(&m, &bz).unwrap_err();
        assert!(matches!(err, BootError::KernelTooBig { mem_mib: 64, .. }), "{err}");
        for p in [junk, short_elf, elf32, bz] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn elf_too_big_for_memory() {
        // A minimal ELF64 with one PT_LOAD at 16 MiB of 100 MiB.
        let mut elf = vec![0u8; 64 + 56];
        elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        elf[ph + 0x18..ph + 0x20].copy_from_slice(&(16u64 << 20).to_le_bytes());
        elf[ph + 0x28..ph + 0x30].copy_from_slice(&(100u64 << 20).to_le_bytes());
        let p = tmp("bigelf", &elf);
        let m = create_guest_memory(64).unwrap();
        let err = load_kernel(&m, &p).unwrap_err();
        assert!(matches!(err, BootError::KernelTooBig { need_mib: 116, .. }), "{err}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn initrd_goes_on_top_and_must_fit() {
        let m: GuestMemoryMmap<()> = create_guest_memory(32).unwrap();
        let p = tmp("initrd", &[7u8; 5000]);
        let (addr, size) = load_initrd(&m, &p, 0x100_0000, u64::MAX).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 0x1000, 0);
        assert!(addr + size <= 32 << 20);
        let mut b = [0u8; 1];
        m.read_slice(&mut b, GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b[0], 7);
        assert!(matches!(
            load_initrd(&m, &p, (32 << 20) - 100, u64::MAX),
            Err(BootError::InitrdTooBig { .. })
        ));
        std::fs::remove_file(p).unwrap();
    }
}
