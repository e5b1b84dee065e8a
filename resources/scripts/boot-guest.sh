#!/usr/bin/env bash
# The README's main command: builds cryptvm and the test guest (when missing), then
# boots the guest with `cryptvm run`, 2 vCPUs, 512 MiB.
#
#   resources/scripts/boot-guest.sh [SCENARIO]
#
#   SCENARIO   boot (default): the guest's kernel boot log, then what the guest sees
#              (CPU, command line, memory), and it powers off; shell: a prompt on the
#              guest's console (hardware virtualisation only, see below); or any
#              resources/guest/scenarios/NAME.sh
#   -h, --help this text
#
# Where /dev/kvm runs guests at native speed (VT-x/AMD-V), cryptvm runs here. On machines
# whose /dev/kvm is software KVM (this project's CI), it runs inside the nested QEMU TCG
# test host (resources/scripts/run-nested.sh), as the end-to-end tests do, and the guest's
# console is shown as it boots (~1 min after the test host's ~30 s). The test host has no
# keyboard path to the guest: `shell` there says so and stops at once.
# CRYPTVM_E2E_MODE=direct|nested overrides the choice.
#
# First run: `cargo build --release` (~5 min, cargo's progress shown), then the guest from
# Debian packages (resources/guest/build.sh, ~1 min, into ~/.cache/cryptvm/guest/).
# Exit status: cryptvm's (0 when the guest powered off).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
log() { echo "boot-guest.sh: $*" >&2; }
case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
scenario="${1:-boot}"
[[ -f "$ROOT/resources/guest/scenarios/$scenario.sh" ]] || {
    log "no scenario $scenario (resources/guest/scenarios/$scenario.sh)"
    exit 2
}

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
if [[ "$mode" == nested && "$scenario" == shell ]]; then
    log "no shell here: this machine has no hardware virtualisation, so the guest runs"
    log "inside the nested QEMU test host, whose console is a log file: keyboard input"
    log "cannot reach the guest. Instead: resources/scripts/boot-guest.sh (scenario boot),"
    log "or put commands in resources/guest/scenarios/NAME.sh and run boot-guest.sh NAME,"
    log "or run on a machine with VT-x/AMD-V (vmx or svm in /proc/cpuinfo)."
    exit 2
fi

cryptvm="${CARGO_TARGET_DIR:-$ROOT/target}/release/cryptvm"
log "building cryptvm (cargo build --release; the first time takes ~5 min)..."
cargo build --release --manifest-path "$ROOT/Cargo.toml" -p vmm
log "building the test guest (resources/guest/build.sh; the first time takes ~1 min)..."
eval "$("$ROOT/resources/guest/build.sh" | grep -E '^(VMLINUZ|INITRAMFS)=')"
cmdline="console=ttyS0 reboot=k panic=-1 cryptvm.scenario=$scenario"

if [[ "$mode" == direct ]]; then
    exec "$cryptvm" run --cpus 2 --memory 512M --kernel "$VMLINUZ" --initrd "$INITRAMFS" \
        --cmdline "$cmdline"
fi

log "/dev/kvm is a software KVM here; booting inside the nested test host"
exec "$ROOT/resources/scripts/run-nested.sh" --cryptvm "$cryptvm" -- --cpus 2 --memory 512M \
    --kernel "$VMLINUZ" --initrd "$INITRAMFS" --cmdline "$cmdline"
