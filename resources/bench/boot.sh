#!/usr/bin/env bash
# Benchmark (not a test): boot time and VMM memory overhead of cryptvm against QEMU 10,
# booting the same test guest (resources/guest/build.sh: Debian's cloud kernel and the
# busybox initramfs) the same way, in the same L1 test host (resources/testhost/), in
# one run, alternating.
#
#   resources/bench/boot.sh                 # builds cryptvm in release mode first
#   CRYPTVM=path/to/cryptvm REPS=5 CPUS=2 MEM_MIB=256 QEMU_MACHINE=microvm resources/bench/boot.sh
#   KEEP=1 resources/bench/boot.sh          # keeps the work folder (consoles, bench.txt)
#   CRYPTVM_KERNEL=vmlinux resources/bench/boot.sh   # cryptvm boots the ELF extracted from
#                                           # the same bzImage QEMU boots (no decompression)
#   CMDLINE="console=ttyS0 printk.time=1 panic=-1" KEEP=1 REPS=1 WARMUP=0 resources/bench/boot.sh
#                                           # timestamped boot logs of both VMMs, to compare
# With KEEP=1, out/VMM.N.times has each console line after the L1 uptime it was read at
# (its first line: the uptime just before the VMM started).
#
# boot time: from just before the VMM process starts to the guest's init marker line
#   (CRYPTVM-GUEST-UP) on its serial console, both taken inside L1 (/proc/uptime, 10 ms).
# memory overhead: VmRSS of the VMM process when the marker appears, minus the resident
#   part of guest RAM (the Rss of its mappings of at least MEM_MIB in /proc/PID/smaps).
# Each VMM boots WARMUP times (1, not counted), then REPS times (3); the best boot time and the median overhead are printed,
# with the ratio cryptvm/QEMU. Timings inside the TCG test host are emulation timings:
# only the ratio between the two VMMs of one run means something.
# QEMU: -enable-kvm -M $QEMU_MACHINE (pc) -cpu host -nodefaults, its firmware from the
# machine's QEMU package.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
. "$ROOT/resources/bench/lib.sh"
REPS="${REPS:-3}"
WARMUP="${WARMUP:-1}"
CPUS="${CPUS:-2}"
MEM_MIB="${MEM_MIB:-256}"
QEMU_MACHINE="${QEMU_MACHINE:-pc}"

require_tools qemu-system-x86_64 cpio

cryptvm_note=
if ! release_cryptvm; then
    cryptvm_note="cryptvm: does not build"
    CRYPTVM=
fi

bench_workdir boot

cmdline="${CMDLINE:-console=ttyS0 quiet panic=-1}"
qemu_cmd="qemu-system-x86_64 -enable-kvm -M $QEMU_MACHINE -cpu host -smp $CPUS -m ${MEM_MIB}M \
-nodefaults -no-user-config -display none -serial stdio -no-reboot \
-kernel /work/guest/vmlinuz -initrd /work/guest/initramfs.cpio.gz -append '$cmdline'"
case "${CRYPTVM_KERNEL:=vmlinuz}" in
    vmlinuz | vmlinux) ;;
    *) echo "boot.sh: CRYPTVM_KERNEL is vmlinuz (the bzImage) or vmlinux (its ELF)" >&2; exit 2 ;;
esac
cryptvm_cmd="cryptvm run --kernel /work/guest/$CRYPTVM_KERNEL --initrd /work/guest/initramfs.cpio.gz \
--cmdline '$cmdline' --cpus $CPUS --memory ${MEM_MIB}M --serial stdio"

# The script L1 runs: each VMM REPS times, alternating; one BENCH line per boot.
cat >"$WORK/run.sh" <<EOF
mem_kb=$((MEM_MIB * 1024))
reps=$REPS
warmup=$WARMUP
have_cryptvm=$([[ -n "$CRYPTVM" ]] && echo 1 || echo 0)
EOF
cat >>"$WORK/run.sh" <<'EOF'
# guest_kb PID: resident KiB of the mappings at least as large as guest RAM.
guest_kb() {
    awk -v min="$mem_kb" '
        /^[0-9a-f]+-[0-9a-f]+ / { size = 0; next }
        /^Size:/ { size = $2; next }
        /^Rss:/ { if (size >= min) sum += $2 }
        END { print sum + 0 }' "/proc/$1/smaps"
}
# kvm_counts PID: L1 KVM's exit counters of the VM of process PID (debugfs), as
# key=value fields: all exits, port I/O, MMIO, HLT, interrupt, and nested page faults fixed.
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
kvm_counts() {
    for d in /sys/kernel/debug/kvm/"$1"-*; do
        [ -r "$d/exits" ] || continue
        echo "exits=$(cat "$d/exits") io=$(cat "$d/io_exits") mmio=$(cat "$d/mmio_exits")" \
            "halt=$(cat "$d/halt_exits") irq=$(cat "$d/irq_exits") npf=$(cat "$d/pf_fixed")"
        return
    done
}
# measure NAME REP COMMAND: boots once, prints a BENCH line.
measure() {
    name=$1 rep=$2 cmd=$3
    fifo=/tmp/console.$name.$rep
    mkfifo "$fifo"
    read -r t0 _ </proc/uptime
    echo "$t0 (VMM starts)" >"/out/$name.$rep.times"
    timeout -s KILL 60 sh -c "exec $cmd" </dev/null >"$fifo" 2>"/out/$name.$rep.stderr" &
    pid=$!
    t1= rss= gkb= kvm=
    while IFS= read -r line; do
        case "$line" in
            *CRYPTVM-GUEST-UP*)
                read -r t1 _ </proc/uptime
                rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)
                gkb=$(guest_kb "$pid" 2>/dev/null)
                kvm=$(kvm_counts "$pid")
                ;;
        esac
        echo "$line" >>"/out/$name.$rep.console"
        read -r tl _ </proc/uptime
        echo "$tl $line" >>"/out/$name.$rep.times"
    done <"$fifo"
    wait "$pid"
    rc=$?
    rm -f "$fifo"
    if [ -n "$t1" ] && [ -n "$rss" ]; then
        echo "BENCH vmm=$name rep=$rep rc=$rc boot_s=$(awk "BEGIN { print $t1 - $t0 }") rss_kb=$rss guest_kb=$gkb overhead_kb=$((rss - gkb)) $kvm"
    else
        echo "BENCH vmm=$name rep=$rep rc=$rc boot_s=none error=$(head -1 "/out/$name.$rep.stderr" | tr ' ' '_')"
    fi
}
# Warm-up boots, not counted: the first boot in a fresh L1 also pays for TCG translating
# L1's KVM code paths.
i=1
while [ $i -le $warmup ]; do
    measure qemu warmup$i "$QEMU_CMD" >/dev/null
    [ $have_cryptvm = 1 ] && measure cryptvm warmup$i "$CRYPTVM_CMD" >/dev/null
    i=$((i + 1))
done
i=1
while [ $i -le $reps ]; do
    measure qemu $i "$QEMU_CMD"
    [ $have_cryptvm = 1 ] && measure cryptvm $i "$CRYPTVM_CMD"
    i=$((i + 1))
done 2>&1 | tee /out/bench.txt
EOF
# The commands go in single-quoted (they hold quotes themselves).
{
    echo "QEMU_CMD='${qemu_cmd//\'/\'\\\'\'}'"
    echo "CRYPTVM_CMD='${cryptvm_cmd//\'/\'\\\'\'}'"
    cat "$WORK/run.sh"
} >"$WORK/run2.sh"

guest_kernel=bzimage
[[ "$CRYPTVM_KERNEL" == vmlinux ]] && guest_kernel=both
pack=(--out "$WORK/l1.img" --qemu --guest --guest-kernel $guest_kernel --run "$WORK/run2.sh")
[[ -n "$CRYPTVM" ]] && pack+=(--bin "$CRYPTVM")
packed=$("$ROOT/resources/testhost/pack.sh" "${pack[@]}")
eval "$packed"
echo "boot.sh: $REPS boots per VMM, $CPUS vCPUs, $MEM_MIB MiB, inside the L1 test host" >&2
run_test_host boot "$WORK/out" $((60 + (REPS + WARMUP) * 2 * 45)) bench.txt

# Best boot time and median overhead per VMM.
summary() {
    awk -v vmm="$1" '
        $1 == "BENCH" {
            delete f
            for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
            if (f["vmm"] != vmm) next
            if (f["boot_s"] == "none") { err = f["error"]; next }
            n++
            if (best == "" || f["boot_s"] + 0 < best) best = f["boot_s"] + 0
            ov[n] = f["overhead_kb"] + 0; rss[n] = f["rss_kb"] + 0; g[n] = f["guest_kb"] + 0
        }
        END {
            if (n == 0) { gsub("_", " ", err); print "none", err; exit }
            # median by insertion sort (n is small)
            for (i = 2; i <= n; i++) for (j = i; j > 1 && ov[j-1] > ov[j]; j--) {
                t = ov[j]; ov[j] = ov[j-1]; ov[j-1] = t
            }
            printf "%.2f %d %d %d\n", best, ov[int((n + 1) / 2)], rss[1], g[1]
        }' "$WORK/out/bench.txt"
}
# exit_counts VMM: L1 KVM's exit counters up to the init marker in VMM's fastest boot.
exit_counts() {
    awk -v vmm="$1" '
        $1 == "BENCH" {
            delete f
            for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
            if (f["vmm"] != vmm || f["boot_s"] == "none" || f["exits"] == "") next
            if (best == "" || f["boot_s"] + 0 < best) {
                best = f["boot_s"] + 0
                line = f["exits"] " " f["io"] " " f["mmio"] " " f["halt"] " " f["irq"] " " f["npf"]
            }
        }
        END { if (line != "") print line }' "$WORK/out/bench.txt"
}
read -r q_boot q_ov q_rss q_guest < <(summary qemu)
read -r c_boot c_ov c_rss c_guest < <(summary cryptvm) || true

echo
echo "Boot time (VMM start to guest init marker) and VMM memory overhead (RSS beyond guest RAM),"
echo "best of $REPS boots / median, $CPUS vCPUs, $MEM_MIB MiB, in the L1 test host (emulation timings)."
printf '%-34s %10s %14s\n' VMM "boot (s)" "overhead (MiB)"
if [[ "$q_boot" == none ]]; then
    echo "qemu: did not boot: $q_ov $q_rss $q_guest"
    exit 1
fi
printf '%-34s %10s %14.1f\n' "QEMU $(qemu-system-x86_64 --version | sed -n '1s/.*version \([^ ]*\).*/\1/p') -M $QEMU_MACHINE" \
    "$q_boot" "$(awk "BEGIN { print $q_ov / 1024 }")"
if [[ -n "$cryptvm_note" ]]; then
    echo "$cryptvm_note"
elif [[ -z "${c_boot:-}" || "$c_boot" == none ]]; then
    echo "cryptvm: not yet able to boot (${c_ov:+$c_ov }${c_rss:-}${c_guest:+ $c_guest})"
else
    printf '%-34s %10s %14.1f\n' "cryptvm ($CRYPTVM_KERNEL)" "$c_boot" "$(awk "BEGIN { print $c_ov / 1024 }")"
    awk "BEGIN { printf \"ratio cryptvm/QEMU: boot %.2f, memory overhead %.2f\n\", $c_boot / $q_boot, ($q_ov > 0 ? $c_ov / $q_ov : 0) }"
fi
q_exits=$(exit_counts qemu)
c_exits=$(exit_counts cryptvm)
if [[ -n "$q_exits" || -n "$c_exits" ]]; then
    echo
    echo "KVM exits up to the init marker (L1's KVM counters, debugfs; each VMM's fastest boot):"
    printf '%-34s %8s %8s %8s %8s %8s %8s\n' VMM all "port I/O" MMIO HLT interrupt "NPT fault"
    [[ -n "$q_exits" ]] && printf '%-34s %8s %8s %8s %8s %8s %8s\n' "QEMU -M $QEMU_MACHINE" $q_exits
    [[ -n "$c_exits" ]] && printf '%-34s %8s %8s %8s %8s %8s %8s\n' cryptvm $c_exits
fi
