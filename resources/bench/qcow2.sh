#!/usr/bin/env bash
# Benchmark (not a test): `cryptvm img bench` against `qemu-img bench` doing the same
# requests on the same qcow2 images, side by side in one run.
#
#   resources/bench/qcow2.sh            # builds cryptvm in release mode first
#   CRYPTVM=path/to/cryptvm SIZE_MIB=256 REPS=1 resources/bench/qcow2.sh   # quicker
#
# Stacks (images made by qemu-img / qemu-io, SIZE_MIB fully written, in tmpfs):
#   qcow2        qcow2 over file. Both tools open it directly.
#   luks/qcow2   luks (detached header) over qcow2 over file, the mission stack.
#                cryptvm opens it in-process (json: name, --object). qemu-img bench has
#                no --object, so qemu-storage-daemon serves the same stack as an NBD
#                export on a Unix socket and qemu-img bench drives
#                nbd+unix:///top?socket=...: the qemu side pays the NBD round trips.
#   qcow2/nbd    reference for that overhead: the plain qcow2 again, cryptvm in-process,
#                qemu-img bench over the same kind of NBD export.
# Workloads (queue depth DEPTH, both tools, the same offsets):
#   4k read/write strided: 4 KiB requests, step 68 KiB (a new 64 KiB cluster each
#                time, at a moving offset inside it) across the whole disk
#   64k read/write seq:    64 KiB requests, step 64 KiB, over the first 512 MiB
# No request wraps around the end of the disk (QEMU 10.0.2 and cryptvm wrap
# differently). Writes write the byte 165 (--pattern) over allocated clusters. Each
# job runs REPS times per tool (alternating) and the best time counts. Afterwards
# `qemu-img check` must find both payloads clean and qemu-io must read the pattern back.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
SIZE_MIB="${SIZE_MIB:-2048}"
REPS="${REPS:-5}"
DEPTH="${DEPTH:-16}"

for tool in qemu-img qemu-io qemu-storage-daemon python3; do
    command -v "$tool" >/dev/null || { echo "qcow2.sh: $tool is not installed" >&2; exit 1; }
done

if [[ -z "${CRYPTVM:-}" ]]; then
    (cd "$ROOT" && cargo build --release --quiet -p vmm --bin cryptvm)
    target_dir="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
    CRYPTVM="$target_dir/release/cryptvm"
fi

base=/dev/shm
[[ -d "$base" && -w "$base" ]] || base="${TMPDIR:-/tmp}"
WORK="$(mktemp -d "$base/cryptvm-bench.XXXXXX")"
QSD_PID=""
cleanup() {
    if [[ -n "$QSD_PID" ]]; then
        kill "$QSD_PID" 2>/dev/null || true
        wait "$QSD_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"

printf 'bench-passphrase' > pass.txt
SECRET="secret,id=sec0,file=$WORK/pass.txt"
SIZE=$((SIZE_MIB << 20))

echo "qcow2 bench: ${SIZE_MIB} MiB disks, queue depth ${DEPTH}, best of ${REPS}, in $WORK"
echo "cryptvm:  $CRYPTVM"
echo "qemu-img: $(qemu-img --version | head -1)"

# fill_cmds: qemu-io commands writing 0x5a over the whole disk, 512 MiB at a time.
fill_cmds() {
    local off
    for ((off = 0; off < SIZE; off += 512 << 20)); do
        local len=$((SIZE - off < 512 << 20 ? SIZE - off : 512 << 20))
        printf -- '-c\0write -P 0x5a %d %d\0' "$off" "$len"
    done
}
mapfile -d '' FILL < <(fill_cmds)

# The plain qcow2, fully written.
qemu-img create -q -f qcow2 plain.qcow2 "$SIZE"
qemu-io -f qcow2 plain.qcow2 "${FILL[@]}" >/dev/null
# The mission stack: a detached luks header, a qcow2 payload, written through luks.
"$CRYPTVM" img create -q --object "$SECRET" -f luks \
    -o detached-header=true,key-secret=sec0,iter-time=10 hdr.img
qemu-img create -q -f qcow2 payload.qcow2 "$SIZE"
STACK_JSON="{\"driver\":\"luks\",\"key-secret\":\"sec0\",\"file\":{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"$WORK/payload.qcow2\"}},\"header\":{\"driver\":\"file\",\"filename\":\"$WORK/hdr.img\"}}"
STACK_OPTS="driver=luks,key-secret=sec0,file.driver=qcow2,file.file.filename=$WORK/payload.qcow2,header.filename=$WORK/hdr.img"
qemu-io --object "$SECRET" --image-opts "$STACK_OPTS" "${FILL[@]}" >/dev/null

# The same stack served by qemu-storage-daemon over NBD (Unix socket), for qemu-img.
SOCK="$WORK/nbd.sock"
# start_daemon JSON: serves the node JSON (without node-name) as export "top".
start_daemon() {
    qemu-storage-daemon --object "$SECRET" \
        --blockdev "{\"node-name\":\"top\",${1#\{}" \
        --nbd-server "addr.type=unix,addr.path=$SOCK" \
        --export type=nbd,id=e0,node-name=top,writable=on &
    QSD_PID=$!
    for _ in $(seq 100); do
        [[ -S "$SOCK" ]] && return 0
        sleep 0.05
    done
    echo "qcow2.sh: qemu-storage-daemon did not start" >&2
    exit 1
}
stop_daemon() {
    kill "$QSD_PID"
    wait "$QSD_PID" 2>/dev/null || true
    QSD_PID=""
    rm -f "$SOCK"
}

less() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }

# seconds TOOL ARGS... : runs `TOOL bench ARGS` and prints the seconds it reports.
seconds() {
    local tool="$1"; shift
    local out
    if [[ "$tool" == cryptvm ]]; then
        out="$("$CRYPTVM" img bench "$@")"
    else
        out="$(qemu-img bench "$@")"
    fi
    sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' <<<"$out"
}

STRIDE=$((68 << 10))
N4K=$(( (SIZE - 4096) / STRIDE ))
N64K=$(( (SIZE_MIB < 512 ? SIZE_MIB : 512) * 16 ))
results=()
# job STACK NAME UNIT COUNT BYTES CRYPTVM-TARGET... -- QEMU-TARGET... -- BENCH-ARGS...
job() {
    local stack="$1" name="$2" unit="$3" count="$4" bytes="$5"; shift 5
    local ours=() theirs=()
    while [[ "$1" != -- ]]; do ours+=("$1"); shift; done; shift
    while [[ "$1" != -- ]]; do theirs+=("$1"); shift; done; shift
    local best_c="" best_q="" t i
    for ((i = 0; i < REPS; i++)); do
        t=$(seconds cryptvm "$@" "${ours[@]}")
        if [[ -z "$best_c" ]] || less "$t" "$best_c"; then best_c=$t; fi
        t=$(seconds qemu-img "$@" "${theirs[@]}")
        if [[ -z "$best_q" ]] || less "$t" "$best_q"; then best_q=$t; fi
    done
    results+=("$(awk -v s="$stack" -v n="$name" -v u="$unit" -v cnt="$count" -v b="$bytes" \
        -v c="$best_c" -v q="$best_q" 'BEGIN {
        # Guard the 0.000 s a very fast run may print.
        if (c < 0.001) c = 0.001; if (q < 0.001) q = 0.001;
        if (u == "IOPS") { rc = cnt / c; rq = cnt / q } else { rc = cnt * b / 1048576 / c; rq = cnt * b / 1048576 / q }
        printf "%-11s %-18s %8.3f %8.3f %10.0f %10.0f %5s %6.2f", s, n, c, q, rc, rq, u, rc / rq }')")
}

workloads() {
    local stack="$1"; shift
    job "$stack" "4k read strided" IOPS "$N4K" 4096 "$@" -c "$N4K" -d "$DEPTH" -s 4k -S "$STRIDE"
    job "$stack" "4k write strided" IOPS "$N4K" 4096 "$@" -w --pattern=165 -c "$N4K" -d "$DEPTH" -s 4k -S "$STRIDE"
    job "$stack" "64k read seq" MiB/s "$N64K" 65536 "$@" -c "$N64K" -d "$DEPTH" -s 64k
    job "$stack" "64k write seq" MiB/s "$N64K" 65536 "$@" -w --pattern=165 -c "$N64K" -d "$DEPTH" -s 64k
}

NBD="nbd+unix:///top?socket=$SOCK"
workloads qcow2 -f qcow2 plain.qcow2 -- -f qcow2 plain.qcow2 --
# Reference: what NBD costs qemu on the plain qcow2 (cryptvm unchanged, in-process).
start_daemon "{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"$WORK/plain.qcow2\"}}"
workloads qcow2/nbd -f qcow2 plain.qcow2 -- -f raw "$NBD" --
stop_daemon
start_daemon "$STACK_JSON"
workloads luks/qcow2 --object "$SECRET" "json:$STACK_JSON" -- -f raw "$NBD" --
stop_daemon

# Both tools wrote the same bytes; qemu checks what is there.
for img in plain.qcow2 payload.qcow2; do
    qemu-img check -q -f qcow2 "$img" ||
        { echo "qcow2.sh: qemu-img check finds errors in $img" >&2; exit 1; }
done
qemu-io -f qcow2 plain.qcow2 -c "read -P 165 0 4k" -c "read -P 165 $STRIDE 4k" \
    -c "read -P 165 0 64k" | grep -q 'verification failed' &&
    { echo "qcow2.sh: the written pattern does not read back (qcow2)" >&2; exit 1; }
qemu-io --object "$SECRET" --image-opts "$STACK_OPTS" -c "read -P 165 0 64k" \
    -c "read -P 165 $STRIDE 4k" | grep -q 'verification failed' &&
    { echo "qcow2.sh: the written pattern does not read back (luks/qcow2)" >&2; exit 1; }

echo
printf '%-11s %-18s %8s %8s %10s %10s %5s %6s\n' "stack" "job" "cryptvm" "qemu" "cryptvm" "qemu" "" "ratio"
printf '%-11s %-18s %8s %8s %10s %10s %5s %6s\n' "" "" "s" "s" "" "" "unit" "c/q"
for line in "${results[@]}"; do
    echo "$line"
done
echo
echo "4k jobs: $N4K requests; 64k jobs: $N64K requests. qcow2/nbd and luks/qcow2: qemu-img bench"
echo "runs over NBD (qemu-storage-daemon, Unix socket) and so pays NBD overhead (qcow2/nbd against"
echo "qcow2 shows how much); cryptvm runs in-process."
