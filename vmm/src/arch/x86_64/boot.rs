//! Loading a Linux guest with linux-loader: ELF vmlinux (PVH entry when its note is
//! present, else the 64-bit boot protocol) or bzImage (64-bit boot protocol), the
//! initramfs at the top of low RAM, the command line, the e820 map and the boot
//! structures (`boot_params` or PVH `hvm_start_info`).

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{
    self, BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::arch::x86_64::layout;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::EntryPoint;

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// Why the guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("opening kernel '{0}': {1}")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    /// Neither ELF nor bzImage.
    #[error("kernel '{0}' is not a kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel(PathBuf),
    /// Recognised but could not be loaded.
    #[error("loading kernel '{0}': {1}")]
    LoadKernel(PathBuf, String),
    /// The initramfs could not be opened or read.
    #[error("reading initramfs '{0}': {1}")]
    ReadInitrd(PathBuf, String),
    /// No room for the initramfs below the kernel's limit.
    #[error(
        "memory too small for the initramfs '{path}' ({size} bytes) with {memory_mib} MiB of RAM"
    )]
    InitrdTooBig {
        /// The initramfs.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Guest RAM in MiB.
        memory_mib: u64,
    },
    /// The command line is too long or not valid.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures to guest memory failed.
    #[error("writing boot structures: {0}")]
    Write(String),
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Offset of the 64-bit entry (`startup_64`) in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

fn write_err(e: impl std::fmt::Display) -> BootError {
    BootError::Write(e.to_string())
}

/// Loads the kernel, initramfs and command line described by `spec` into `mem` (a guest
/// with `memory` bytes of RAM) and writes the boot structures, pointing the guest at the
/// ACPI RSDP when given. Returns the boot vCPU's entry point.
pub fn load_guest(
    mem: &GuestMemoryMmap,
    memory: u64,
    spec: &BootSpec,
    rsdp: Option<GuestAddress>,
) -> Result<EntryPoint, BootError> {
    let kernel = &spec.kernel;
    let mut file = File::open(kernel).map_err(|e| BootError::OpenKernel(kernel.clone(), e))?;
    let highmem = Some(GuestAddress(layout::HIGH_RAM_START));
    let load_err = |e: loader::Error| {
        let msg = match e {
            loader::Error::Elf(loader::elf::Error::ReadKernelImage)
            | loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageCompressedKernel) => {
                format!("it does not fit in {} MiB of guest RAM", memory >> 20)
            }
            e => e.to_string(),
        };
        BootError::LoadKernel(kernel.clone(), msg)
    };
    let result = match Elf::load(mem, None, &mut file, highmem) {
        Ok(r) => r,
        Err(loader::Error::Elf(
            loader::elf::Error::InvalidElfMagicNumber | loader::elf::Error::ReadElfHeader,
        )) => match BzImage::load(mem, None, &mut file, highmem) {
            Ok(r) => r,
            Err(loader::Error::Bzimage(
                loader::bzimage::Error::InvalidBzImage
                | loader::bzimage::Error::ReadBzImageHeader
                | loader::bzimage::Error::Underflow,
            )) => return Err(BootError::NotAKernel(kernel.clone())),
            Err(e) => return Err(load_err(e)),
        },
        Err(e) => return Err(load_err(e)),
    };
    let kernel_end = kernel_footprint_end(&result);

    // Command line.
    let capacity = match &result.setup_header {
        Some(hdr) if hdr.version >= 0x206 => {
            (hdr.cmdline_size as usize + 1).min(layout::CMDLINE_MAX_SIZE)
        }
        Some(_) => 256,
        None => layout::CMDLINE_MAX_SIZE,
    };
    if spec.cmdline.len() >= capacity {
        return Err(BootError::Cmdline(format!(
            "{} bytes is too long (at most {})",
            spec.cmdline.len(),
            capacity - 1
        )));
    }
    let mut cmdline = Cmdline::new(capacity).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(&spec.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_size = spec.cmdline.len() as u32 + 1;

    // Initramfs: as high as the kernel allows in low RAM, above the kernel's footprint.
    let initrd = match &spec.initrd {
        Some(path) => {
            let addr_max = match &result.setup_header {
                Some(hdr) if hdr.version >= 0x203 => u64::from(hdr.initrd_addr_max),
                Some(_) => 0x37ff_ffff,
                None => u64::from(u32::MAX),
            };
            Some(load_initrd(mem, memory, path, addr_max, kernel_end)?)
        }
        None => None,
    };

    let e820 = layout::e820_map(memory);
    let rsdp_addr = rsdp.map_or(0, |a| a.0);
    if let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap {
        write_pvh_info(mem, &e820, initrd, rsdp_addr)?;
        return Ok(EntryPoint::Pvh {
            entry: entry.0,
            start_info: layout::PVH_INFO_START,
        });
    }

    let mut params = boot_params::default();
    let entry = match result.setup_header {
        Some(hdr) => {
            params.hdr = hdr;
            result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET
        }
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            result.kernel_load.0
        }
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp_addr;
    if e820.len() > params.e820_table.len() {
        return Err(write_err("too many e820 entries"));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(write_err)?;
    Ok(EntryPoint::Linux64 {
        entry,
        boot_params: layout::ZERO_PAGE_START,
    })
}

/// End of the memory the kernel will use while starting: for a bzImage, the larger of its
/// loaded image and the area it decompresses into (`pref_address + init_size`).
fn kernel_footprint_end(result: &KernelLoaderResult) -> u64 {
    let mut end = result.kernel_end;
    if let Some(hdr) = &result.setup_header {
        if hdr.version >= 0x20a {
            let base = hdr.pref_address.max(result.kernel_load.0);
            end = end.max(base.saturating_add(u64::from(hdr.init_size)));
        }
    }
    end
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    memory: u64,
    path: &Path,
    addr_max: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |e: String| BootError::ReadInitrd(path.to_path_buf(), e);
    let mut file = File::open(path).map_err(|e| read_err(e.to_string()))?;
    let size = file.metadata().map_err(|e| read_err(e.to_string()))?.len();
    let too_big = || BootError::InitrdTooBig {
        path: path.to_path_buf(),
        size,
        memory_mib: memory >> 20,
    };
    let top = addr_max.saturating_add(1).min(layout::low_ram_end(memory));
    let lowest = kernel_end.next_multiple_of(PAGE_SIZE);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= lowest && size <= u64::from(u32::MAX))
        .ok_or_else(too_big)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| read_err(e.to_string()))?;
    Ok((addr, size))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    e820: &[layout::E820Entry],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(layout::PVH_MODLIST_START))
            .map_err(write_err)?;
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_START;
    }
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at =
            layout::PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at)).map_err(write_err)?;
    }
    mem.write_obj(info, GuestAddress(layout::PVH_INFO_START))
        .map_err(write_err)?;
    // The PVH structures must lie in RAM.
    mem.checked_offset(GuestAddress(layout::PVH_INFO_START), 1)
        .ok_or_else(|| write_err("PVH start info outside RAM"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        crate::vstate::memory::create_guest_memory(size).unwrap()
    }

    /// A minimal ELF64 with one PT_LOAD segment at `paddr` and optionally a PVH note.
    fn tiny_elf(paddr: u64, pvh_entry: Option<u32>) -> Vec<u8> {
        let code = [0xf4u8; 16];
        let mut note = Vec::new();
        if let Some(entry) = pvh_entry {
            note.extend(4u32.to_le_bytes()); // namesz
            note.extend(4u32.to_le_bytes()); // descsz
            note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            note.extend(b"Xen\0");
            note.extend(entry.to_le_bytes());
        }
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let data_off = 64 + 56 * u64::from(phnum);
        let mut f = Vec::new();
        f.extend(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend(2u16.to_le_bytes()); // ET_EXEC
        f.extend(62u16.to_le_bytes()); // x86-64
        f.extend(1u32.to_le_bytes());
        f.extend(paddr.to_le_bytes()); // e_entry
        f.extend(64u64.to_le_bytes()); // e_phoff
        f.extend(0u64.to_le_bytes()); // e_shoff
        f.extend(0u32.to_le_bytes());
        f.extend(64u16.to_le_bytes()); // ehsize
        f.extend(56u16.to_le_bytes()); // phentsize
        f.extend(phnum.to_le_bytes());
        f.extend([0u8; 6]);
        let phdr = |f: &mut Vec<u8>, ty: u32, off: u64, addr: u64, len: u64| {
            f.extend(ty.to_le_bytes());
            f.extend(5u32.to_le_bytes());
            f.extend(off.to_le_bytes());
            f.extend(addr.to_le_bytes());
            f.extend(addr.to_le_bytes());
            f.extend(len.to_le_bytes());
            f.extend(len.to_le_bytes());
            f.extend(8u64.to_le_bytes());
        };
        phdr(&mut f, 1, data_off, paddr, code.len() as u64);
        if pvh_entry.is_some() {
            phdr(
                &mut f,
                4,
                data_off + code.len() as u64,
                0,
                note.len() as u64,
            );
        }
        f.extend(code);
        f.extend(note);
        f
    }

    fn spec(dir: &Path, kernel: &[u8], initrd: Option<usize>) -> BootSpec {
        std::fs::write(dir.join("k"), kernel).unwrap();
        let initrd = initrd.map(|n| {
            std::fs::write(dir.join("i"), vec![0x5a; n]).unwrap();
            dir.join("i")
        });
        BootSpec {
            kernel: dir.join("k"),
            initrd,
            cmdline: "console=ttyS0".into(),
        }
    }

    #[test]
    fn elf_boot_params_and_initrd() {
        let dir = tempfile::tempdir().unwrap();
        let size = 32 << 20;
        let m = mem(size);
        let s = spec(dir.path(), &tiny_elf(0x100_0000, None), Some(10_000));
        let entry = load_guest(&m, size, &s, Some(GuestAddress(0xe0000))).unwrap();
        assert_eq!(
            entry,
            EntryPoint::Linux64 {
                entry: 0x100_0000,
                boot_params: layout::ZERO_PAGE_START
            }
        );
        let p: boot_params = m.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_size }, 10_000);
        let ramdisk = u64::from(p.hdr.ramdisk_image);
        assert_eq!(ramdisk % 4096, 0);
        assert!(ramdisk + 10_000 <= size && ramdisk >= 0x100_0000);
        assert_eq!(m.read_obj::<u8>(GuestAddress(ramdisk)).unwrap(), 0x5a);
        assert_eq!(p.e820_entries as usize, layout::e820_map(size).len());
        let mut c = [0u8; 14];
        m.read_slice(&mut c, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&c, b"console=ttyS0\0");
    }

    #[test]
    fn pvh_entry() {
        let dir = tempfile::tempdir().unwrap();
        let size = 32 << 20;
        let m = mem(size);
        let s = spec(
            dir.path(),
            &tiny_elf(0x100_0000, Some(0x100_0008)),
            Some(100),
        );
        let entry = load_guest(&m, size, &s, None).unwrap();
        assert_eq!(
            entry,
            EntryPoint::Pvh {
                entry: 0x100_0008,
                start_info: layout::PVH_INFO_START
            }
        );
        let info: hvm_start_info = m.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.size, 100);
    }

    #[test]
    fn errors() {
        let dir = tempfile::tempdir().unwrap();
        let size = 32 << 20;
        let m = mem(size);
        let s = spec(dir.path(), &[0x42; 5000], None);
        assert!(matches!(
            load_guest(&m, size, &s, None),
            Err(BootError::NotAKernel(_))
        ));
        let s = spec(dir.path(), &[], None);
        assert!(matches!(
            load_guest(&m, size, &s, None),
            Err(BootError::NotAKernel(_))
        ));
        let s = spec(dir.path(), &tiny_elf(0x100_0000, None), Some(31 << 20));
        let e = load_guest(&m, size, &s, None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("memory too small for the initramfs"),
            "{e}"
        );
        let mut s = spec(dir.path(), &tiny_elf(0x100_0000, None), None);
        s.cmdline = "x".repeat(5000);
        assert!(matches!(
            load_guest(&m, size, &s, None),
            Err(BootError::Cmdline(_))
        ));
        let s = spec(dir.path(), &tiny_elf(0x400_0000, None), None);
        assert!(matches!(
            load_guest(&m, size, &s, None),
            Err(BootError::LoadKernel(..))
        ));
        let mut s = s;
        s.kernel = dir.path().join("missing");
        assert!(matches!(
            load_guest(&m, size, &s, None),
            Err(BootError::OpenKernel(..))
        ));
    }
}
