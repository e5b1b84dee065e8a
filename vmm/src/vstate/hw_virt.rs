//! Whether this host's KVM runs guests with hardware virtualisation, so that
//! `cryptvm run` can say up front when a Linux guest will take minutes to boot.

/// The warning `cryptvm run` prints once when the CPU has no hardware
/// virtualisation (neither `vmx` nor `svm` in /proc/cpuinfo) while a KVM device
/// works: a software or paravirtual KVM (such as kvm-pvm inside a cloud VM),
/// which runs guest kernel code about 1000x slower. `None` on hardware KVM, or
/// when /proc/cpuinfo cannot be read.
pub fn slow_kvm_warning() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    (!has_hw_virt(&cpuinfo)).then(|| {
        "warning: this CPU has no hardware virtualisation (no vmx or svm flag in \
         /proc/cpuinfo), so /dev/kvm is a software KVM: guest kernel code runs about \
         1000x slower than on VT-x/AMD-V, and a Linux guest takes many minutes to boot, \
         printing nothing for a long time. resources/scripts/boot-guest.sh boots the test \
         guest inside a nested test host instead (docs/run.md)."
            .to_string()
    })
}

/// Whether a /proc/cpuinfo text lists `vmx` or `svm` among some CPU's flags.
fn has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::has_hw_virt;

    #[test]
    fn flags_decide() {
        let intel = "processor\t: 0\nflags\t\t: fpu vme vmx sse2\nbugs\t\t: spectre_v1\n";
        let amd = "flags\t\t: fpu svm sse4a\n";
        let none = "processor\t: 0\nflags\t\t: fpu aes avx512f\nvmx flags\t: ept\n";
        assert!(has_hw_virt(intel));
        assert!(has_hw_virt(amd));
        // "vmx flags" is a key of its own, not the flags line.
        assert!(!has_hw_virt(none));
        assert!(!has_hw_virt(""));
        assert!(!has_hw_virt("flags\t\t: svmx vmxe\n"));
    }
}
