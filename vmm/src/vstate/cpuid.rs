//! Per-vCPU CPUID: KVM's supported set plus topology (APIC ids, one socket of `cpus`
//! single-threaded cores), the hypervisor bit and the KVM paravirt leaves. Modelled on
//! Cloud Hypervisor's `arch/src/x86_64/mod.rs` and Firecracker's `cpuid/normalize.rs`.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1 ECX: running under a hypervisor.
const HYPERVISOR_BIT: u32 = 1 << 31;
/// Leaf 1 EDX: multi-threading (more than one logical processor per package).
const HTT_BIT: u32 = 1 << 28;
/// The KVM signature leaf and its value ("KVMKVMKVM\0\0\0").
const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Leaf 1 ECX: the LAPIC timer has TSC-deadline mode.
const TSC_DEADLINE_BIT: u32 = 1 << 24;

/// Advertises the TSC-deadline timer in leaf 1 of `cpuid` (when KVM emulates it).
pub fn set_tsc_deadline(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        if e.function == 1 {
            e.ecx |= TSC_DEADLINE_BIT;
        }
    }
}

/// Bits of the x2APIC id that select the core inside the package.
fn core_bits(cpus: u8) -> u32 {
    u32::from(cpus).next_power_of_two().trailing_zeros()
}

fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx,
        padding: [0; 3],
    }
}

/// Extended topology leaf (0xB or 0x1F): SMT level (1 thread per core), core level
/// (`cpus` cores), then the invalid level that ends the enumeration.
fn topology_leaf(function: u32, apic_id: u32, cpus: u8) -> Vec<kvm_cpuid_entry2> {
    const LEVEL_SMT: u32 = 1 << 8;
    const LEVEL_CORE: u32 = 2 << 8;
    vec![
        entry(function, 0, 0, 1, LEVEL_SMT, apic_id),
        entry(
            function,
            1,
            core_bits(cpus),
            u32::from(cpus),
            1 | LEVEL_CORE,
            apic_id,
        ),
        entry(function, 2, 0, 0, 2, apic_id),
    ]
}

/// Whether the vendor string of leaf 0 is AMD's (or Hygon's).
fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries.iter().find(|e| e.function == 0).is_some_and(|e| {
        // "AuthenticAMD": ebx "Auth", edx "enti", ecx "cAMD"; Hygon "HygonGenuine".
        (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
            || (e.ebx, e.edx, e.ecx) == (0x6f67_7948, 0x6e65_476e, 0x656e_6975)
    })
}

/// The CPUID entries of vCPU `cpu_id` (its APIC id) out of `cpus`, from KVM's supported
/// entries `base`.
pub fn vcpu_cpuid_entries(
    base: &[kvm_cpuid_entry2],
    cpu_id: u8,
    cpus: u8,
) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(cpu_id);
    let amd = is_amd(base);
    let max_leaf = base.iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(base.len() + 6);
    for e in base {
        let mut e = *e;
        match e.function {
            0xb | 0x1f => continue, // rebuilt below
            1 => {
                // EBX: initial APIC id [31:24], logical processors per package [23:16],
                // CLFLUSH line size in 8-byte units [15:8].
                let logical = u32::from(cpus).next_power_of_two().min(255);
                e.ebx = (apic_id << 24) | (logical << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= HYPERVISOR_BIT;
                if cpus > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            4 if !amd => {
                // Deterministic cache parameters: cores per package - 1 [31:26]; threads
                // sharing the cache - 1 [25:14]: 1 for L1/L2, the whole package for L3.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { u32::from(cpus) - 1 } else { 0 };
                e.eax =
                    (e.eax & 0x3fff) | (sharing.min(0xfff) << 14) | ((u32::from(cpus) - 1) << 26);
            }
            KVM_SIGNATURE_LEAF => {
                e.eax = e.eax.max(KVM_FEATURES_LEAF);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            0x8000_0008 if amd => {
                // NC [7:0] = cores - 1; ApicIdSize [15:12].
                e.ecx = (e.ecx & !0xf0ff) | (core_bits(cpus) << 12) | (u32::from(cpus) - 1);
            }
            0x8000_001e if amd => {
                // Extended APIC id, core id (one thread per core), node 0.
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xffff) | apic_id;
                e.ecx &= !0x7ff;
            }
            _ => {}
        }
        out.push(e);
    }
    if max_leaf >= 0xb {
        out.extend(topology_leaf(0xb, apic_id, cpus));
    }
    if max_leaf >= 0x1f {
        out.extend(topology_leaf(0x1f, apic_id, cpus));
    }
    if !out.iter().any(|e| e.function == KVM_SIGNATURE_LEAF) {
        let mut sig = entry(KVM_SIGNATURE_LEAF, 0, KVM_FEATURES_LEAF, 0, 0, 0);
        sig.flags = 0;
        [sig.ebx, sig.ecx, sig.edx] = KVM_SIGNATURE;
        out.push(sig);
    }
    out
}

/// [`vcpu_cpuid_entries`] as the `KVM_SET_CPUID2` argument.
pub fn vcpu_cpuid(base: &CpuId, cpu_id: u8, cpus: u8) -> Result<CpuId, String> {
    let entries = vcpu_cpuid_entries(base.as_slice(), cpu_id, cpus);
    CpuId::from_entries(&entries).map_err(|e| format!("building CPUID: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_deadline_bit_goes_to_leaf_1_only() {
        let mut c =
            CpuId::from_entries(&[entry(0, 0, 1, 0, 0, 0), entry(1, 0, 0, 0, 0x1, 0)]).unwrap();
        set_tsc_deadline(&mut c);
        let e = c.as_slice();
        assert_eq!(e[1].ecx, 0x1 | TSC_DEADLINE_BIT);
        assert_eq!(e[0].ecx, 0);
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn topology_and_signature() {
        let mut leaf0 = entry(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65);
        leaf0.flags = 0;
        let base = vec![
            leaf0,
            entry(1, 0, 0x00a2_0f12, 0x00ff_00ff, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 5),
            entry(0x8000_0008, 0, 0x3030, 0, 0x7007, 0),
        ];
        let v = vcpu_cpuid_entries(&base, 3, 4);
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xff, 0xff);
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0);
        assert_ne!(l1.edx & HTT_BIT, 0);
        let smt = find(&v, 0xb, 0);
        let core = find(&v, 0xb, 1);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
        assert_eq!(find(&v, 0xb, 2).ecx, 2);
        assert_eq!(v.iter().filter(|e| e.function == 0xb).count(), 3);
        assert!(!v.iter().any(|e| e.function == 0x1f));
        assert_eq!(find(&v, 0x8000_0008, 0).ecx, 0x2003);
        let sig = find(&v, KVM_SIGNATURE_LEAF, 0);
        let bytes: Vec<u8> = [sig.ebx, sig.ecx, sig.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        let one = vcpu_cpuid_entries(&base, 0, 1);
        assert_eq!(find(&one, 1, 0).edx & HTT_BIT, 0);
        assert_eq!(find(&one, 0xb, 1).eax, 0);
    }
}
