#!/usr/bin/env bash
# The README's main command: builds cryptvm and the test guest (when missing), then
# boots the guest with `cryptvm run`, 2 vCPUs, 512 MiB.
#
#   resources/scripts/boot-guest.sh [SCENARIO]     # default: boot (prints what the guest
#                                                  # sees, powers off); "shell" for a prompt
#
# Where /dev/kvm runs guests at native speed (VT-x/AMD-V), cryptvm runs here. On machines
# whose /dev/kvm is software KVM (this project's CI), it runs inside the nested QEMU TCG
# test host (resources/testhost), as the end-to-end tests do; the guest's console is shown.
# CRYPTVM_E2E_MODE=direct|nested overrides the choice.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
scenario="${1:-boot}"
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" -p vmm
cryptvm="$ROOT/target/release/cryptvm"
eval "$("$ROOT/resources/guest/build.sh" | grep -E '^(VMLINUZ|INITRAMFS)=')"
cmdline="console=ttyS0 quiet cryptvm.scenario=$scenario"

mode="${CRYPTVM_E2E_MODE:-}"
if [[ -z "$mode" ]]; then
    # Hardware virtualisation (vmx/svm) means /dev/kvm runs guests at native speed;
    # without it, /dev/kvm (if any) is a software implementation.
    if [[ -e /dev/kvm ]] && grep -qw -E 'vmx|svm' /proc/cpuinfo; then
        mode=direct
    else
        mode=nested
    fi
fi

if [[ "$mode" == direct ]]; then
    exec "$cryptvm" run --cpus 2 --memory 512M --kernel "$VMLINUZ" --initrd "$INITRAMFS" \
        --cmdline "$cmdline"
fi

echo "boot-guest.sh: /dev/kvm is slow here; booting inside the nested test host" >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat > "$work/run.sh" <<RUN
#!/bin/sh
/usr/local/bin/cryptvm run --cpus 2 --memory 512M --kernel /work/guest/vmlinuz \
    --initrd /work/guest/initramfs.cpio.gz --cmdline "$cmdline"
echo "cryptvm exit status: \$?"
RUN
eval "$("$ROOT/resources/testhost/pack.sh" --out "$work/l1.img" --bin "$cryptvm" --guest \
    --guest-kernel bzimage --run "$work/run.sh" | grep -E '^L1_(KERNEL|INITRD)=')"
"$ROOT/resources/testhost/launch.sh" --kernel "$L1_KERNEL" --initrd "$L1_INITRD" \
    --console "$work/console.txt" --timeout 300 || true
# Show the guest's part of the console.
sed -n '/cryptvm run\|CRYPTVM-GUEST-UP/,$p' "$work/console.txt" | tr -d '\r'
