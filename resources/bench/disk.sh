#!/usr/bin/env bash
# Benchmark (not a test): guest disk I/O through cryptvm's virtio-blk against QEMU 10's,
# the same guest workload on the same block stacks in the same L1 test host
# (resources/testhost/), in one run.
#
#   resources/bench/disk.sh                 # builds cryptvm in release mode first
#   CRYPTVM=path/to/cryptvm SECS=3 REPS=2 SPAN_MIB=128 CPUS=2 resources/bench/disk.sh
#   KEEP=1 resources/bench/disk.sh          # keeps the work folder (consoles, results)
#   REPORT=/tmp/cryptvm-bench-disk.XXXXXX resources/bench/disk.sh   # its table again
#
# Disks (the same -object/-blockdev/-device JSON for both VMMs; cryptvm reads it from a
# --config file):
#   luks/qcow2  luks with a detached header (made by QEMU's own LUKS code:
#               resources/scripts/qemu-luks-create.py, aes-256-xts-plain64) over qcow2
#               (preallocation=full) over file: the mission stack
#   raw         raw over file (preallocation=full), for reference
# Both SPAN_MIB (128) in size, made by qemu-img inside L1 in a tmpfs.
# Workload (resources/guest/scenarios/diskbench.sh, the guest's blkio helper): for each
# disk, sequential 1 MiB writes and reads from 1 thread, random 4 KiB writes and reads
# from RANDJOBS (4) threads with one request in flight each, all O_DIRECT, SECS (3)
# seconds each, timed by the guest's clock (checked against L1's: the run is reported as
# suspect when they differ by over 25%).
# Each VMM boots REPS (2) times, the order alternating; the best figure counts. Timings
# inside the TCG test host are emulation timings: only the ratio cryptvm/QEMU of one run
# means something.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
. "$ROOT/resources/bench/lib.sh"
SECS="${SECS:-3}"
REPS="${REPS:-2}"
SPAN_MIB="${SPAN_MIB:-128}"
CPUS="${CPUS:-2}"
MEM_MIB="${MEM_MIB:-256}"
RANDJOBS="${RANDJOBS:-4}"

require_tools qemu-system-x86_64 qemu-img python3 cpio

# One line per result: VMM REP DISK WORKLOAD MBPS IOPS ERRORS GUEST_SECS L1_SECS.
results() {
    local f vmm rep
    for f in "$WORK"/out/*.console; do
        vmm=$(basename "$f" | cut -d. -f1)
        rep=$(basename "$f" | cut -d. -f2)
        awk -v vmm="$vmm" -v rep="$rep" '
            { sub(/\r$/, "") }
            / BENCH-BEGIN / {
                delete f
                for (i = 2; i <= NF; i++) if (split($i, kv, "=") == 2) f[kv[1]] = kv[2]
                begin[f["disk"] "/" f["workload"]] = $1
            }
            / BENCH-RESULT / {
                delete f
                for (i = 2; i <= NF; i++) if (split($i, kv, "=") == 2) f[kv[1]] = kv[2]
                k = f["disk"] "/" f["workload"]
                if (f["mbps"] == "") { print vmm, rep, f["disk"], f["workload"], "none"; next }
                print vmm, rep, f["disk"], f["workload"], f["mbps"], f["iops"], f["errors"],
                    f["secs"], $1 - begin[k]
            }' "$f"
    done
}
# best VMM DISK WORKLOAD FIELD(5: MB/s, 6: IOPS): the best over the boots, or "none".
best() {
    awk -v vmm="$1" -v disk="$2" -v w="$3" -v col="$4" '
        $1 == vmm && $3 == disk && $4 == w && $5 != "none" && $7 == 0 {
            if (b == "" || $col + 0 > b) b = $col + 0
        }
        END { print (b == "" ? "none" : b) }' "$WORK/results.txt"
}
# missing_jobs: "VMM:DISK/WORKLOAD" for each job without a figure from that VMM.
missing_jobs() {
    local vmm disk w col
    results >"$WORK/results.txt"
    for vmm in qemu $([[ -n "$CRYPTVM" ]] && echo cryptvm); do
        for disk in luks raw; do
            for w in seqread seqwrite randread randwrite; do
                case $w in seq*) col=5 ;; *) col=6 ;; esac
                [[ $(best "$vmm" "$disk" "$w" "$col") == none ]] && echo "$vmm:$disk/$w"
            done
        done
    done
    return 0
}

# report: the table from the consoles in $WORK/out.
report() {
results >"$WORK/results.txt"
grep -h "BENCH-INFO clocksource" "$WORK"/out/*.console | head -2 |
    sed 's/^[0-9.]* /disk.sh: guest: /' >&2 || true

# Largest relative difference between the guest's and L1's timing of one workload.
skew=$(awk '$5 != "none" && $9 > 0 { d = ($8 - $9) / $9; if (d < 0) d = -d; if (d > m) m = d }
    END { printf "%.0f", m * 100 }' "$WORK/results.txt")

qemu_version=$(qemu-system-x86_64 --version | sed -n '1s/.*version \([^ ]*\).*/\1/p')
echo
echo "Guest disk I/O, virtio-blk-pci, O_DIRECT, ${SECS} s per job, best of $REPS boots, $CPUS vCPUs,"
echo "${SPAN_MIB} MiB disks in an L1 tmpfs, in the L1 test host (emulation timings: compare the ratio)."
printf '%-11s %-22s %12s %12s %8s\n' disk job "QEMU $qemu_version" cryptvm ratio
status=0
for disk in luks raw; do
    stack=$([[ $disk == luks ]] && echo luks/qcow2 || echo raw)
    for w in seqread seqwrite randread randwrite; do
        case $w in
            seq*) col=5 unit=MB/s job="${w#seq} 1M seq" ;;
            rand*) col=6 unit=IOPS job="${w#rand} 4k rand QD$RANDJOBS" ;;
        esac
        q=$(best qemu "$disk" "$w" "$col")
        c=$(best cryptvm "$disk" "$w" "$col")
        ratio=-
        [[ "$q" != none && "$c" != none ]] && ratio=$(awk "BEGIN { printf \"%.2f\", $c / $q }")
        [[ "$q" == none ]] && status=1
        printf '%-11s %-22s %12s %12s %8s\n' "$stack" "$job ($unit)" "$q" "$c" "$ratio"
    done
done
if [[ -n "$cryptvm_note" ]]; then
    echo "$cryptvm_note"
elif ! grep -q '^cryptvm ' "$WORK/results.txt"; then
    echo "cryptvm: no results ($(head -c 300 "$WORK"/out/cryptvm.1.stderr 2>/dev/null | tr '\n' ' '))"
fi
echo "guest clock against L1's: largest difference ${skew}%$([[ ${skew:-0} -gt 25 ]] && echo ' (suspect run)')"
# A job whose guest saw I/O errors (its figure is not counted).
awk '$5 != "none" && $7 != 0 { print "note: " $1 "." $2 ": " $3 "/" $4 ": " $7 " I/O errors in the guest" }' \
    "$WORK/results.txt"
# A boot whose guest did not power off (a VMM ends with status 0 on a guest reset too).
for f in "$WORK"/out/*.console; do
    [[ -e "$f" ]] || continue
    grep -aq 'reboot: Power down' "$f" && continue
    run=$(basename "$f" .console)
    # (A guest that died before its first workload has no BENCH-BEGIN: not an error here.)
    last=$(grep -a 'BENCH-BEGIN' "$f" | tail -1 | sed 's/.*BENCH-BEGIN //; s/\r$//') || true
    rc=$(sed -n "s/^BENCH-RUN vmm=${run%%.*} rep=${run#*.} rc=//p" "$WORK/out/runs.txt" | tr -d '\r') || true
    err=$(head -c 300 "$WORK/out/$run.stderr" 2>/dev/null | tr '\n' ' ') || true
    echo "note: $run: the guest stopped without powering off, during ${last:-its boot} (VMM exit status ${rc:-?}; console: out/$run.console; VMM stderr: ${err:-none})"
done
if [[ $status -ne 0 ]]; then
    echo "disk.sh: QEMU produced no result for some jobs:" >&2
    tail -5 "$WORK"/out/qemu.1.console "$WORK"/out/qemu.1.stderr >&2 2>/dev/null || true
fi
return $status
}

if [[ -n "${REPORT:-}" ]]; then
    WORK=$REPORT cryptvm_note=
    report
    exit
fi

cryptvm_note=
if ! release_cryptvm; then
    cryptvm_note="cryptvm: does not build"
    CRYPTVM=
fi

bench_workdir disk

# The header, by QEMU; the images are made inside L1 (a preallocated image would
# otherwise travel in L1's initramfs).
printf 'bench-passphrase' >"$WORK/pass.txt"
python3 "$ROOT/resources/scripts/qemu-luks-create.py" --passphrase-file "$WORK/pass.txt" \
    --header "$WORK/disk.header" -o iter-time=10 >/dev/null

D=/bench
objects=("{\"qom-type\":\"secret\",\"id\":\"sec0\",\"file\":\"$D/pass.txt\"}")
blockdevs=(
    "{\"node-name\":\"hdr-storage\",\"driver\":\"file\",\"filename\":\"$D/disk.header\"}"
    '{"node-name":"hdr","driver":"raw","file":"hdr-storage"}'
    "{\"node-name\":\"payload\",\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"$D/disk.qcow2\"}}"
    '{"node-name":"disk0","driver":"luks","file":"payload","header":"hdr","key-secret":"sec0"}'
    "{\"node-name\":\"raw-file\",\"driver\":\"file\",\"filename\":\"$D/disk.raw\"}"
    '{"node-name":"disk1","driver":"raw","file":"raw-file"}'
)
devices=(
    '{"driver":"virtio-blk-pci","drive":"disk0","id":"virtio-disk0","serial":"bench-luks"}'
    '{"driver":"virtio-blk-pci","drive":"disk1","id":"virtio-disk1","serial":"bench-raw"}'
)
join() { local IFS=,; echo "$*"; }
echo "{\"objects\":[$(join "${objects[@]}")],\"blockdevs\":[$(join "${blockdevs[@]}")],\"devices\":[$(join "${devices[@]}")]}" >"$WORK/vm.json"
python3 -m json.tool "$WORK/vm.json" >/dev/null || { echo "disk.sh: bad config JSON" >&2; exit 1; }

cmdline="console=ttyS0 quiet panic=-1 cryptvm.scenario=diskbench cryptvm.bench=$SECS,1,$RANDJOBS"
qemu_cmd="qemu-system-x86_64 -enable-kvm -M pc -cpu host -smp $CPUS -m ${MEM_MIB}M \
-nodefaults -no-user-config -display none -serial stdio -no-reboot \
-kernel /work/guest/vmlinuz -initrd /work/guest/initramfs.cpio.gz -append '$cmdline'"
for o in "${objects[@]}"; do qemu_cmd+=" -object '$o'"; done
for b in "${blockdevs[@]}"; do qemu_cmd+=" -blockdev '$b'"; done
for d in "${devices[@]}"; do qemu_cmd+=" -device '$d'"; done
cryptvm_cmd="cryptvm run --kernel /work/guest/vmlinuz --initrd /work/guest/initramfs.cpio.gz \
--cmdline '$cmdline' --cpus $CPUS --memory ${MEM_MIB}M --serial stdio --config $D/vm.json"

# The script L1 runs: the images, then each VMM REPS times, the order alternating; every
# console line with L1's uptime in front.
{
    echo "QEMU_CMD='${qemu_cmd//\'/\'\\\'\'}'"
    echo "CRYPTVM_CMD='${cryptvm_cmd//\'/\'\\\'\'}'"
    echo "reps=$REPS span=${SPAN_MIB}M limit=$((60 + 2 * 4 * (SECS + 5)))"
    echo "have_cryptvm=$([[ -n "$CRYPTVM" ]] && echo 1 || echo 0)"
    cat <<'EOF'
mkdir -p /bench
mount -t tmpfs -o size=75% tmpfs /bench
cp /work/pass.txt /work/disk.header /work/vm.json /bench/
qemu-img create -q -f qcow2 -o preallocation=full /bench/disk.qcow2 $span &&
    qemu-img create -q -f raw -o preallocation=full /bench/disk.raw $span || {
    echo "BENCH-ERROR qemu-img create failed"; exit 1
}
# measure NAME REP COMMAND: one boot, its console in /out/NAME.REP.console.
measure() {
    name=$1 rep=$2 cmd=$3
    fifo=/tmp/console.$name.$rep
    mkfifo "$fifo"
    timeout -s KILL $limit sh -c "exec $cmd" </dev/null >"$fifo" 2>"/out/$name.$rep.stderr" &
    pid=$!
    while IFS= read -r line; do
        read -r t _ </proc/uptime
        echo "$t $line"
    done <"$fifo" >"/out/$name.$rep.console"
    wait "$pid"
    echo "BENCH-RUN vmm=$name rep=$rep rc=$?"
    rm -f "$fifo"
}
i=1
while [ $i -le $reps ]; do
    if [ $((i % 2)) = 1 ]; then order="qemu cryptvm"; else order="cryptvm qemu"; fi
    for v in $order; do
        case $v in
            qemu) measure qemu $i "$QEMU_CMD" ;;
            cryptvm) [ $have_cryptvm = 1 ] && measure cryptvm $i "$CRYPTVM_CMD" ;;
        esac
    done
    i=$((i + 1))
done 2>&1 | tee /out/runs.txt
EOF
} >"$WORK/run.sh"

pack=(--out "$WORK/l1.img" --qemu --bin "$(command -v qemu-img)" --guest --guest-kernel bzimage
    --file "$WORK/pass.txt=pass.txt" --file "$WORK/disk.header=disk.header"
    --file "$WORK/vm.json=vm.json" --run "$WORK/run.sh")
[[ -n "$CRYPTVM" ]] && pack+=(--bin "$CRYPTVM")
packed=$("$ROOT/resources/testhost/pack.sh" "${pack[@]}")
eval "$packed"
echo "disk.sh: ${SPAN_MIB} MiB disks, ${SECS} s per workload, $REPS boots per VMM, $CPUS vCPUs, inside the L1 test host" >&2
# run_l1 DIR: one L1 boot running every VMM boot; their consoles in DIR.
run_l1() { run_test_host disk "$1" $((120 + REPS * 2 * (60 + 8 * (SECS + 5)))) runs.txt; }
run_l1 "$WORK/out"
# The test host's emulation occasionally kills a guest of either VMM mid-workload; when
# some job then has no figure for one VMM, both boot REPS more times (numbered on, so the
# report names every boot that died).
missing=$(missing_jobs | tr '\n' ' ')
if [[ -n "$missing" ]]; then
    echo "disk.sh: no figure for ${missing}after $REPS boots each; $REPS more boots each" >&2
    if (run_l1 "$WORK/out2"); then
        for f in "$WORK"/out2/*.*.*; do
            b=$(basename "$f") name=${b%%.*} rest=${b#*.}
            mv "$f" "$WORK/out/$name.$((${rest%%.*} + REPS)).${rest#*.}"
        done
        awk -v n="$REPS" '{ sub(/rep=[0-9]+/, "rep=" substr($0, index($0, "rep=") + 4) + n) } 1' \
            "$WORK/out2/runs.txt" >>"$WORK/out/runs.txt"
        REPS=$((REPS * 2))
    else
        echo "disk.sh: the test host of the extra boots failed; the first boots' figures follow" >&2
    fi
fi

report
