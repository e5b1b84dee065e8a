#!/usr/bin/env bash
# Boots the L1 test host: QEMU TCG with nested SVM, so that kvm-amd works inside it.
#
#   resources/testhost/launch.sh --kernel VMLINUZ --initrd L1.img --console FILE
#       [--out-dir DIR] [--out-size MIB] [--disk FILE]... [--timeout SECONDS]
#
#   --console FILE    L1's serial console (L1's kernel, its /init, and what run.sh prints);
#                     a failed attempt's console is kept as FILE.failed-N
#   --out-dir DIR     a fresh raw disk is L1's /dev/vda; L1's /init writes /out onto it as
#                     a tar archive, extracted here into DIR afterwards
#   --out-size MIB    size of that disk (64)
#   --disk FILE       more raw disks for L1 (/dev/vdb, ...)
#   --hostfwd H:G     QEMU user networking for L1 (a virtio-net-pci NIC; L1 needs pack.sh
#                     --net), forwarding TCP port H of the host's 127.0.0.1 to L1's port G
#                     (repeatable); without it L1 has no network
#   --timeout SECONDS QEMU is killed after this long (120); exit status 124 then
#   --retries N       boot L1 again when QEMU itself crashed before L1's /init ended (3)
#   --up-deadline S   boot L1 again when its /init has not said CRYPTVM-L1-UP after S
#                     seconds (60): TCG now and then hangs L1's kernel early
#   --stall S         boot L1 again when, once up, its heartbeat (CRYPTVM-L1-ALIVE every
#                     5 s) has been missing for S seconds (60), or its kernel reports a
#                     soft lockup: TCG also hangs it later
#
# Exit status: QEMU's (0 when L1 powered off), or 124 on timeout.
set -euo pipefail

log() { echo "testhost/launch.sh: $*" >&2; }
kernel='' initrd='' console='' outdir='' outsize=64 timeout=120 retries=3 up_deadline=60 stall=60
disks=() fwds=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --kernel) kernel=$2; shift 2 ;;
        --initrd) initrd=$2; shift 2 ;;
        --console) console=$2; shift 2 ;;
        --out-dir) outdir=$2; shift 2 ;;
        --out-size) outsize=$2; shift 2 ;;
        --disk) disks+=("$2"); shift 2 ;;
        --hostfwd) fwds+=("$2"); shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --retries) retries=$2; shift 2 ;;
        --up-deadline) up_deadline=$2; shift 2 ;;
        --stall) stall=$2; shift 2 ;;
        *) log "unknown argument $1"; exit 2 ;;
    esac
done
[[ -n "$kernel" && -n "$initrd" && -n "$console" ]] || {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}
command -v qemu-system-x86_64 >/dev/null || { log "qemu-system-x86_64 is not installed"; exit 1; }

drives=()
if [[ -n "$outdir" ]]; then
    mkdir -p "$outdir"
    outimg="$outdir/.l1-out.img"
    rm -f "$outimg"
    truncate -s "${outsize}M" "$outimg"
    drives+=(-drive "file=$outimg,if=virtio,format=raw")
fi
for d in "${disks[@]}"; do
    drives+=(-drive "file=$d,if=virtio,format=raw")
done
nic=(-nic none)
if [[ ${#fwds[@]} -gt 0 ]]; then
    netdev=user,id=l1net
    for f in "${fwds[@]}"; do
        netdev+=",hostfwd=tcp:127.0.0.1:${f%%:*}-:${f#*:}"
    done
    # No option ROM: L1 boots with -kernel, not from the network.
    nic=(-netdev "$netdev" -device virtio-net-pci,netdev=l1net,romfile=)
fi

# QEMU 10.0.2's multi-threaded TCG now and then aborts early in L1's boot
# ("iotlb_to_section: Assertion `section_index < d->map.sections_nb' failed"): an L1 that
# died (or powered off) before its /init finished is booted again, up to --retries times (3).
attempt=0
while :; do
    set +e
    timeout --kill-after=5 "$timeout" qemu-system-x86_64 \
        -accel tcg,thread=multi -cpu EPYC,+svm,+npt -smp 2 -m 2048 \
        -nographic -no-reboot "${nic[@]}" -no-user-config \
        -kernel "$kernel" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 quiet" \
        "${drives[@]}" </dev/null >"$console" 2>&1 &
    qemu_pid=$!
    # An L1 whose kernel hangs in TCG before its /init is up (RCU stalls, a lost timer)
    # would only end at the timeout: give it up_deadline seconds, then boot it again. Once
    # up, the same for an L1 that stops beating for stall seconds (the console's size
    # stands still: the heartbeat adds a line every 5 s).
    hung=0 waited=0 up=0 quiet=0 size=0
    while kill -0 "$qemu_pid" 2>/dev/null; do
        if [[ $up -eq 0 ]] && grep -q CRYPTVM-L1-UP "$console" 2>/dev/null; then
            up=1
        fi
        # A vCPU of L1 stuck in its KVM: the kernel's soft-lockup report (seen for 9 minutes
        # on end while the other vCPU still beat) means it will not come back.
        if [[ $up -eq 0 && $waited -ge $up_deadline ]] || [[ $quiet -ge $stall ]] ||
            grep -q 'BUG: soft lockup' "$console" 2>/dev/null; then
            hung=1
            kill "$qemu_pid" 2>/dev/null
            break
        fi
        sleep 1
        waited=$((waited + 1))
        new_size=$(stat -c %s "$console" 2>/dev/null || echo 0)
        if [[ $up -eq 1 && $new_size -eq $size ]]; then
            quiet=$((quiet + 1))
        else
            quiet=0 size=$new_size
        fi
    done
    wait "$qemu_pid"
    status=$?
    set -e
    [[ $status -eq 137 ]] && status=124
    [[ $hung -eq 1 ]] && status=125
    if [[ $status -eq 124 ]] || grep -q CRYPTVM-L1-END "$console" ||
        [[ $attempt -ge $retries ]]; then
        break
    fi
    attempt=$((attempt + 1))
    # The failed attempt's console, for a reader (the next attempt overwrites $console).
    cp "$console" "$console.failed-$attempt" 2>/dev/null || true
    what="died (status $status"
    [[ $status -eq 125 ]] && what="hung (silent for ${stall} s, or a soft lockup"
    log "L1 $what: $(grep -v 'TCG doesn' "$console" | tail -1 | tr -d '\r')); booting it again ($attempt/$retries)"
    [[ -n "$outdir" ]] && truncate -s 0 "$outimg" && truncate -s "${outsize}M" "$outimg"
done

if [[ -n "$outdir" ]]; then
    # An L1 that died before writing its archive leaves zeros: tar then finds nothing.
    tar -xf "$outimg" -C "$outdir" 2>/dev/null || log "no result archive on L1's disk"
    rm -f "$outimg"
fi
exit $status
