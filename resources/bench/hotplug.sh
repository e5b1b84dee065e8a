#!/usr/bin/env bash
# Benchmark (not a test): QMP disk hotplug latency of cryptvm against QEMU 10, the same
# guest and the same commands in the same L1 test host (resources/testhost/), in one run.
#
#   resources/bench/hotplug.sh              # builds cryptvm in release mode first
#   CRYPTVM=path/to/cryptvm REPS=2 ROUNDS=4 CPUS=2 resources/bench/hotplug.sh   # more boots
#   KEEP=1 resources/bench/hotplug.sh       # keeps the work folder (consoles, transcripts)
#
# The guest boots with no disk and runs the baked "hotplug" scenario
# (resources/guest/scenarios/hotplug.sh, hp.rounds=ROUNDS): each round it polls for
# /dev/vda (every 2 ms), reads its first 4 KiB, and waits for the disk to go. Next to the
# VMM, resources/testhost/qmp-hotplug.sh (one `cryptvm ctl` connection to the VMM's Unix
# socket) sends per round the seven commands of QEMU's detached-header procedure (secret,
# file + raw header, file + qcow2 payload, luks, device_add virtio-blk-pci), then
# device_del, waits for DEVICE_DELETED, blockdev-del x5, object-del; `quit` at the end.
#
# latency: from device_add's reply (as ctl prints it) to the guest's `CRYPTVM-HP seen`
#   console line, both in L1's /proc/uptime (10 ms steps; the driver polls the console
#   file every 10 ms).
# Also: the seven commands' time (first request to device_add's reply) and device_del's
# reply to DEVICE_DELETED (the guest's eject). Each VMM boots REPS (1) times, the order
# alternating, ROUNDS (8) rounds a boot; medians over all rounds, side by side, with the
# ratio cryptvm/QEMU. Timings inside the TCG test host are emulation timings: only the
# ratio of one run means something. QEMU: -enable-kvm -M pc -cpu host -nodefaults.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
. "$ROOT/resources/bench/lib.sh"
REPS="${REPS:-1}"
ROUNDS="${ROUNDS:-8}"
CPUS="${CPUS:-2}"
MEM_MIB="${MEM_MIB:-256}"

require_tools qemu-system-x86_64 qemu-img python3 cpio

# No ctl without cryptvm: nothing can be measured.
release_cryptvm || { echo "hotplug.sh: cryptvm does not build" >&2; exit 1; }

bench_workdir hotplug

# The disk: a detached header made by QEMU's own LUKS code, a small qcow2 payload.
mkdir -p "$WORK/files"
printf 'bench-passphrase' >"$WORK/files/pass.txt"
python3 "$ROOT/resources/scripts/qemu-luks-create.py" --passphrase-file "$WORK/files/pass.txt" \
    --header "$WORK/files/disk.header" -o iter-time=10 >/dev/null
qemu-img create -q -f qcow2 "$WORK/files/disk.qcow2" 64M

cmdline="console=ttyS0 quiet panic=-1 cryptvm.scenario=hotplug hp.rounds=$ROUNDS hp.linger=30"
qemu_cmd="qemu-system-x86_64 -enable-kvm -M pc -cpu host -smp $CPUS -m ${MEM_MIB}M \
-nodefaults -no-user-config -display none -serial stdio -no-reboot \
-kernel /work/guest/vmlinuz -initrd /work/guest/initramfs.cpio.gz -append '$cmdline' \
-qmp unix:/tmp/qmp.sock,server=on,wait=off"
cryptvm_cmd="cryptvm run --kernel /work/guest/vmlinuz --initrd /work/guest/initramfs.cpio.gz \
--cmdline '$cmdline' --cpus $CPUS --memory ${MEM_MIB}M --serial stdio --qmp /tmp/qmp.sock"

# The script L1 runs: each VMM REPS times, the order alternating, with the driver.
{
    echo "QEMU_CMD='${qemu_cmd//\'/\'\\\'\'}'"
    echo "CRYPTVM_CMD='${cryptvm_cmd//\'/\'\\\'\'}'"
    echo "reps=$REPS rounds=$ROUNDS limit=$((90 + ROUNDS * 20))"
    cat <<'EOF'
# measure NAME REP COMMAND: one boot and its hotplug rounds; BENCH lines on stdout.
measure() {
    name=$1 rep=$2 cmd=$3
    rm -f /tmp/qmp.sock
    timeout -s KILL $limit sh -c "exec $cmd" </dev/null >"/out/$name.$rep.console" \
        2>"/out/$name.$rep.stderr" &
    pid=$!
    mkdir -p "/out/$name.$rep"
    CRYPTVM_CTL='cryptvm ctl --socket /tmp/qmp.sock' CRYPTVM_CONSOLE="/out/$name.$rep.console" \
        CRYPTVM_FILES=/work/files CRYPTVM_OUT="/out/$name.$rep" HP_ROUNDS=$rounds CRYPTVM_VMM_PID=$pid \
        timeout -s KILL $limit sh /work/qmp-hotplug.sh >"/out/$name.$rep.driver" 2>&1
    drc=$?
    [ $drc = 0 ] || { sleep 10; kill -9 $pid 2>/dev/null; } &
    wait $pid
    rc=$?
    sed -n "s/^HOTPLUG round=/BENCH vmm=$name rep=$rep round=/p" "/out/$name.$rep.driver"
    echo "BENCH-RUN vmm=$name rep=$rep driver=$drc rc=$rc"
    [ $drc = 0 ] || { tail -3 "/out/$name.$rep.driver"; head -3 "/out/$name.$rep.stderr"; } |
        sed "s/^/BENCH-ERROR vmm=$name rep=$rep /"
}
i=1
while [ $i -le $reps ]; do
    if [ $((i % 2)) = 1 ]; then order="qemu cryptvm"; else order="cryptvm qemu"; fi
    for v in $order; do
        case $v in
            qemu) measure qemu $i "$QEMU_CMD" ;;
            cryptvm) measure cryptvm $i "$CRYPTVM_CMD" ;;
        esac
    done
    i=$((i + 1))
done 2>&1 | tee /out/bench.txt
EOF
} >"$WORK/run.sh"

packed=$("$ROOT/resources/testhost/pack.sh" --out "$WORK/l1.img" --qemu --bin "$CRYPTVM" \
    --guest --guest-kernel bzimage --file "$ROOT/resources/testhost/qmp-hotplug.sh=qmp-hotplug.sh" \
    --file "$WORK/files/pass.txt=files/pass.txt" \
    --file "$WORK/files/disk.header=files/disk.header" \
    --file "$WORK/files/disk.qcow2=files/disk.qcow2" --run "$WORK/run.sh")
eval "$packed"
echo "hotplug.sh: $REPS boots per VMM, $ROUNDS hotplug rounds each, $CPUS vCPUs, inside the L1 test host" >&2
run_test_host hotplug "$WORK/out" $((60 + REPS * 2 * (90 + ROUNDS * 20))) bench.txt

# median VMM FIELD: the median of FIELD over that VMM's rounds, and their count.
median() {
    awk -v vmm="$1" -v key="$2" '
        $1 == "BENCH" {
            delete f
            for (i = 2; i <= NF; i++) if (split($i, kv, "=") == 2) f[kv[1]] = kv[2]
            if (f["vmm"] == vmm && f[key] != "") v[++n] = f[key] + 0
        }
        END {
            if (n == 0) { print "none 0"; exit }
            for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j-1] > v[j]; j--) {
                t = v[j]; v[j] = v[j-1]; v[j-1] = t
            }
            m = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
            printf "%.3f %d\n", m, n
        }' "$WORK/out/bench.txt"
}
ratio() { [[ "$1" != none && "$2" != none ]] && awk "BEGIN { printf \"%.2f\", $2 / $1 }" || echo -; }

qemu_version=$(qemu-system-x86_64 --version | sed -n '1s/.*version \([^ ]*\).*/\1/p')
read -r q_lat qn < <(median qemu latency_s)
read -r c_lat cn < <(median cryptvm latency_s)
echo
echo "QMP hotplug of a luks (detached header) / qcow2 disk, median of ${qn} (QEMU) and ${cn} (cryptvm)"
echo "rounds ($REPS boots x $ROUNDS), $CPUS vCPUs, in the L1 test host (emulation timings: compare the ratio)."
printf '%-40s %12s %10s %8s\n' "seconds" "QEMU $qemu_version" cryptvm ratio
for row in "latency_s:device_add reply -> guest sees /dev/vda" \
    "add_s:the seven commands" "del_s:device_del reply -> DEVICE_DELETED"; do
    key=${row%%:*}
    read -r q _ < <(median qemu "$key")
    read -r c _ < <(median cryptvm "$key")
    printf '%-40s %12s %10s %8s\n' "${row#*:}" "$q" "$c" "$(ratio "$q" "$c")"
done
grep -h '^BENCH-ERROR' "$WORK/out/bench.txt" || true
status=0
if [[ "$q_lat" == none ]]; then
    echo "hotplug.sh: QEMU produced no result:" >&2
    tail -5 "$WORK"/out/qemu.1.driver >&2 2>/dev/null || true
    status=1
fi
[[ "$c_lat" == none ]] && echo "cryptvm: no result ($(tail -1 "$WORK"/out/cryptvm.1.driver 2>/dev/null))"
exit $status
