//! vCPU set-up (CPUID, MSRs, FPU, LAPIC, boot registers) and the vCPU run loop.
//!
//! The boot state follows Firecracker's `arch/x86_64/regs.rs` (long mode with identity
//! page tables, or 32-bit protected mode for PVH) and the Linux boot protocol
//! (`Documentation/arch/x86/boot.rst`, "64-bit boot protocol": `__BOOT_CS` = 0x10,
//! `__BOOT_DS` = 0x18, RSI = boot_params).

use std::sync::{Arc, RwLock};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout;
use crate::vstate::exit::{ExitReason, ExitState};
use crate::vstate::memory::GuestMemoryMmap;
use devices::{lock_device, Bus};

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit long mode, paging on (identity map of the first 4 GiB): the Linux 64-bit
    /// boot protocol, RSI = `boot_params` address.
    Linux64 {
        /// Entry (`startup_64`).
        entry: u64,
        /// Address of `boot_params` (zero page).
        boot_params: u64,
    },
    /// 32-bit protected mode, paging off: the PVH boot protocol, RBX = `hvm_start_info`.
    Pvh {
        /// The PVH entry from the ELF note.
        entry: u64,
        /// Address of `hvm_start_info`.
        start_info: u64,
    },
}

/// Why a vCPU could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: {what}: {source}")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// What was being done.
        what: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Anything else.
    #[error("vCPU {id}: {msg}")]
    Other {
        /// vCPU index.
        id: u8,
        /// Message.
        msg: String,
    },
}

// Control register and EFER bits.
const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

// GDT: null, null, __BOOT_CS (0x10), __BOOT_DS (0x18), TSS (0x20).
const GDT_CODE: u8 = 2;
const GDT_DATA: u8 = 3;
const GDT_TSS: u8 = 4;

/// A GDT descriptor from flags (type/S/DPL/P in 7:0, AVL/L/DB/G in 15:12), base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

fn gdt_table(long_mode: bool) -> [u64; 5] {
    if long_mode {
        [
            0,
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, read/execute
            gdt_entry(0xc093, 0, 0xfffff), // data, read/write
            gdt_entry(0x808b, 0, 0xfffff), // busy 64-bit TSS
        ]
    } else {
        [
            0,
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff), // 32-bit flat code
            gdt_entry(0xc093, 0, 0xffff_ffff), // 32-bit flat data
            gdt_entry(0x008b, 0, 0x67),        // busy 32-bit TSS
        ]
    }
}

/// Writes the boot GDT, the empty IDT and (long mode) the identity page tables for the
/// first 4 GiB (2 MiB pages) into guest memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap, long_mode: bool) -> Result<(), String> {
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| format!("writing boot tables at {addr:#x}: {e}"))
    };
    for (i, e) in gdt_table(long_mode).iter().enumerate() {
        w(layout::BOOT_GDT_START + 8 * i as u64, *e)?;
    }
    w(layout::BOOT_IDT_START, 0)?;
    if long_mode {
        // Present | writable.
        w(layout::PML4_START, layout::PDPTE_START | 0x3)?;
        for pd in 0..layout::BOOT_PD_COUNT {
            let pd_addr = layout::PDE_START + pd * 0x1000;
            w(layout::PDPTE_START + pd * 8, pd_addr | 0x3)?;
            for i in 0..512u64 {
                // 2 MiB page: present | writable | page size.
                let phys = ((pd << 9) + i) << 21;
                w(pd_addr + i * 8, phys | 0x83)?;
            }
        }
    }
    Ok(())
}

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, what, source }
}

/// MSRs every vCPU starts with (Firecracker's `create_boot_msr_entries`).
fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_MEM_TYPE_WB: u64 = 6;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Sets one LVT register of a `kvm_lapic_state` to `mode` (delivery mode bits 10:8).
fn set_lvt_delivery(regs: &mut [std::os::raw::c_char; 1024], reg: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[reg..reg + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[reg..reg + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

/// Configures vCPU `id` of `cpus`: CPUID, MSRs, FPU, LAPIC LINT0 = ExtINT and LINT1 = NMI;
/// and for the boot vCPU (`entry` given) the registers of the boot protocol. APs keep
/// KVM's reset state and wait for INIT/SIPI (in-kernel LAPIC).
pub fn configure_vcpu(
    fd: &VcpuFd,
    id: u8,
    cpus: u8,
    supported_cpuid: &CpuId,
    entry: Option<EntryPoint>,
) -> Result<(), VcpuError> {
    let cpuid = crate::vstate::cpuid::vcpu_cpuid(supported_cpuid, id, cpus)
        .map_err(|msg| VcpuError::Other { id, msg })?;
    fd.set_cpuid2(&cpuid)
        .map_err(kvm_err(id, "setting CPUID"))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::Other {
        id,
        msg: format!("building MSR list: {e:?}"),
    })?;
    let set = fd.set_msrs(&msrs).map_err(kvm_err(id, "setting MSRs"))?;
    if set != entries.len() {
        return Err(VcpuError::Other {
            id,
            msg: format!("KVM refused MSR {:#x}", entries[set].index),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(kvm_err(id, "setting FPU state"))?;

    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 4;
    const APIC_MODE_EXTINT: u32 = 7;
    let mut lapic = fd.get_lapic().map_err(kvm_err(id, "reading LAPIC"))?;
    set_lvt_delivery(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_delivery(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic).map_err(kvm_err(id, "setting LAPIC"))?;

    if let Some(entry) = entry {
        set_boot_registers(fd, id, entry)?;
    }
    Ok(())
}

fn set_boot_registers(fd: &VcpuFd, id: u8, entry: EntryPoint) -> Result<(), VcpuError> {
    let long_mode = matches!(entry, EntryPoint::Linux64 { .. });
    let mut sregs = fd.get_sregs().map_err(kvm_err(id, "reading sregs"))?;
    let gdt = gdt_table(long_mode);
    let code = segment_from_gdt(gdt[GDT_CODE as usize], GDT_CODE);
    let data = segment_from_gdt(gdt[GDT_DATA as usize], GDT_DATA);
    let tss = segment_from_gdt(gdt[GDT_TSS as usize], GDT_TSS);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Linux64 { entry, boot_params } => {
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
            regs.rsi = boot_params;
        }
        EntryPoint::Pvh { entry, start_info } => {
            sregs.cr0 = X86_CR0_PE;
            sregs.cr4 = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
    }
    fd.set_sregs(&sregs).map_err(kvm_err(id, "setting sregs"))?;
    fd.set_regs(&regs)
        .map_err(kvm_err(id, "setting registers"))?;
    Ok(())
}

/// Shared access to a bus, surviving a poisoned lock (a panicking writer must not stop
/// every vCPU).
fn read_bus(bus: &RwLock<Bus>) -> std::sync::RwLockReadGuard<'_, Bus> {
    bus.read().unwrap_or_else(|e| e.into_inner())
}

/// A guest read at `addr`: the bus lock is released before the device runs, so a
/// device may remap itself (a PCI BAR move) from inside the access.
fn bus_read(bus: &RwLock<Bus>, addr: u64, data: &mut [u8]) {
    let target = read_bus(bus).resolve(addr);
    match target {
        Some((offset, dev)) => lock_device(&dev).read(offset, data),
        None => data.fill(0xff),
    }
}

/// A guest write at `addr`; see [`bus_read`].
fn bus_write(bus: &RwLock<Bus>, addr: u64, data: &[u8]) {
    let target = read_bus(bus).resolve(addr);
    if let Some((offset, dev)) = target {
        lock_device(&dev).write(offset, data);
    }
}

/// A configured vCPU ready to run on its own thread.
pub struct Vcpu {
    /// Index (and APIC id).
    pub id: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port I/O bus shared by all vCPUs.
    pub pio: Arc<RwLock<Bus>>,
    /// MMIO bus shared by all vCPUs.
    pub mmio: Arc<RwLock<Bus>>,
    /// Where exits are reported and stop requests read.
    pub exit: Arc<ExitState>,
    /// Keeps guest RAM mapped while the vCPU may run.
    pub _memory: GuestMemoryMmap,
}

impl Vcpu {
    /// Registers worth reporting when the guest dies (RIP, control registers, mode).
    fn state(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            _ => "registers unavailable".into(),
        }
    }

    /// Runs the guest until the VM stops (exit requested by anyone) or this vCPU fails.
    pub fn run(mut self) {
        while !self.exit.stopping() {
            let outcome = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    bus_read(&self.pio, u64::from(port), data);
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    bus_write(&self.pio, u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    bus_read(&self.mmio, addr, data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    bus_write(&self.mmio, addr, data);
                    None
                }
                // A triple fault or a reset KVM could not handle: as Firecracker, the VM ends.
                Ok(VcpuExit::Shutdown) => {
                    eprintln!("cryptvm: vCPU {}: triple fault: {}", self.id, self.state());
                    Some(Ok(ExitReason::Shutdown))
                }
                Ok(VcpuExit::Hlt) => Some(Ok(ExitReason::Shutdown)),
                Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Ok(ExitReason::PowerOff),
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Ok(ExitReason::Reset),
                    kvm_bindings::KVM_SYSTEM_EVENT_CRASH => {
                        Err(format!("vCPU {}: guest crashed", self.id))
                    }
                    other => Err(format!("vCPU {}: unexpected system event {other}", self.id)),
                }),
                Ok(VcpuExit::Intr) => None,
                Ok(other) => Some(Err(format!(
                    "vCPU {}: unexpected KVM exit {other:?}",
                    self.id
                ))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(Err(format!("vCPU {}: KVM_RUN: {e}", self.id))),
            };
            match outcome {
                None => {}
                Some(Ok(reason)) => self.exit.request(reason),
                Some(Err(msg)) => self.exit.fail(msg),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trip() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), GDT_CODE);
        assert_eq!(code.selector, 0x10);
        assert_eq!(
            (code.l, code.db, code.g, code.present, code.s),
            (1, 0, 1, 1, 1)
        );
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), GDT_TSS);
        assert_eq!((tss.limit, tss.g, tss.s, tss.type_), (0x67, 0, 0, 0xb));
        let data = segment_from_gdt(gdt_entry(0xc093, 0x1234_5678, 0xfffff), GDT_DATA);
        assert_eq!(data.base, 0x1234_5678);
        assert_eq!(data.selector, 0x18);
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn lvt_delivery_mode() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[0x350 + 1] = 0x17; // mask bit 16 clear, some mode set
        set_lvt_delivery(&mut regs, 0x350, 7);
        assert_eq!(regs[0x351] as u8, 0x17);
        set_lvt_delivery(&mut regs, 0x350, 4);
        assert_eq!(regs[0x351] as u8, 0x14);
    }
}
