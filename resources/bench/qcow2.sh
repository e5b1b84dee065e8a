#!/usr/bin/env bash
# Benchmark (not a test): `cryptvm img bench` against `qemu-img bench` doing the same
# requests on the same qcow2 images, side by side in one run, next to the machine's limits.
#
#   resources/bench/qcow2.sh            # builds cryptvm in release mode first
#   CRYPTVM=path/to/cryptvm SIZE_MIB=256 DISK_SIZE_MIB=128 REPS=1 DISK_REPS=1 resources/bench/qcow2.sh
#   BENCH_DISK_DIR=/some/disk/folder resources/bench/qcow2.sh
#
# Where: a tmpfs folder (/dev/shm, SIZE_MIB disks: the CPU is the limit) and a folder on
# a real disk (DISK_SIZE_MIB disks; BENCH_DISK_DIR, else the cargo target folder, else
# $TMPDIR or /var/tmp, the first that is not tmpfs): the same jobs in both.
#
# Stacks (images made by qemu-img / qemu-io, fully written):
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
# differently). Writes write the byte 165 (--pattern) over allocated clusters. Neither
# tool flushes (qemu-img bench does not wait for a --flush-interval flush in the time it
# reports), so disk-backed writes measure the way into the page cache.
#
# Cache state, the same for every tool and dd: before each timed run the image files
# are written back and their page cache dropped (fsync, then POSIX_FADV_DONTNEED), so
# that disk-backed reads really read the disk (on tmpfs there is no cache to drop).
#
# Limits printed next to the figures: in the disk-backed folder, for 64k reads, `dd bs=1M`
# reading the same bytes of the image file (cache dropped) into /dev/null (one reader:
# cryptvm's several threads can beat it); for the luks/qcow2 rows, AES-256-XTS alone at
# the request size on every core (`openssl speed -evp aes-256-xts -multi NPROC`), in
# requests per second or MiB/s; the lower of the two where both apply. Unflushed writes
# have no disk limit. No goals: the ratios are reported, not judged.
#
# Each job runs REPS (tmpfs) or DISK_REPS (disk) times per tool, alternating, and the
# best time counts. Afterwards
# `qemu-img check` must find both payloads clean and qemu-io must read the pattern back.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
SIZE_MIB="${SIZE_MIB:-2048}"
DISK_SIZE_MIB="${DISK_SIZE_MIB:-256}"
REPS="${REPS:-5}"
DISK_REPS="${DISK_REPS:-3}"
DEPTH="${DEPTH:-16}"
# shellcheck source=resources/bench/lib.sh
source "$ROOT/resources/bench/lib.sh"
# shellcheck source=resources/bench/limits.sh
source "$ROOT/resources/bench/limits.sh"

require_tools qemu-img qemu-io qemu-storage-daemon python3 openssl dd
release_cryptvm || { echo "qcow2.sh: cryptvm does not build" >&2; exit 1; }

tmpfs_base=/dev/shm
[[ -d "$tmpfs_base" && -w "$tmpfs_base" && "$(fs_type "$tmpfs_base")" == tmpfs ]] || tmpfs_base=""
disk="$(disk_base)"
DIRS=()
QSD_PID=""
cleanup() {
    if [[ -n "$QSD_PID" ]]; then
        kill "$QSD_PID" 2>/dev/null || true
        wait "$QSD_PID" 2>/dev/null || true
    fi
    if [[ ${#DIRS[@]} -gt 0 ]]; then rm -rf "${DIRS[@]}"; fi
}
trap cleanup EXIT

echo "qcow2 bench: queue depth ${DEPTH}, best of ${REPS} (tmpfs) and ${DISK_REPS} (disk)"
echo "cryptvm:  $CRYPTVM"
echo "qemu-img: $(qemu-img --version | head -1)"
CIPHER_4K="$(cipher_limit_mibs 4096)"
CIPHER_64K="$(cipher_limit_mibs 65536)"
echo "cipher:   AES-256-XTS ${CIPHER_4K} MiB/s at 4 KiB, ${CIPHER_64K} MiB/s at 64 KiB, $(nproc) cores (openssl speed -evp aes-256-xts -multi $(nproc))"

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

# start_daemon JSON: serves the node JSON (without node-name) as NBD export "top".
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

rows=()
# job WHERE STACK NAME UNIT COUNT BYTES LIMIT FILES CRYPTVM-TARGET... -- QEMU-TARGET... --
#     BENCH-ARGS... : times both tools; LIMIT is in UNIT or "-"; FILES are the image
#     files whose cache is dropped before each run.
job() {
    local where="$1" stack="$2" name="$3" unit="$4" count="$5" bytes="$6" limit="$7" files="$8"
    shift 8
    local ours=() theirs=()
    while [[ "$1" != -- ]]; do ours+=("$1"); shift; done; shift
    while [[ "$1" != -- ]]; do theirs+=("$1"); shift; done; shift
    local best_c="" best_q="" t i
    for ((i = 0; i < reps; i++)); do
        # shellcheck disable=SC2086
        drop_cache $files
        t=$(seconds cryptvm "$@" "${ours[@]}")
        if [[ -z "$best_c" ]] || less "$t" "$best_c"; then best_c=$t; fi
        # shellcheck disable=SC2086
        drop_cache $files
        t=$(seconds qemu-img "$@" "${theirs[@]}")
        if [[ -z "$best_q" ]] || less "$t" "$best_q"; then best_q=$t; fi
    done
    rows+=("$(awk -v w="$where" -v s="$stack" -v n="$name" -v u="$unit" -v cnt="$count" \
        -v b="$bytes" -v c="$best_c" -v q="$best_q" -v l="$limit" 'BEGIN {
        # Guard the 0.000 s a very fast run may print.
        if (c < 0.001) c = 0.001; if (q < 0.001) q = 0.001;
        if (u == "IOPS") { rc = cnt / c; rq = cnt / q } else { rc = cnt * b / 1048576 / c; rq = cnt * b / 1048576 / q }
        ls = (l == "-") ? "-" : sprintf("%.0f", l); lr = (l == "-") ? "-" : sprintf("%.0f%%", 100 * rc / l)
        printf "%-6s %-11s %-17s %10.0f %10.0f %5s %7.2f %10s %7s", w, s, n, rc, rq, u, rc / rq, ls, lr }')")
}

# min_limit A B: the lower of two limits, either of which may be "-".
min_limit() {
    if [[ "$1" == - ]]; then echo "$2"; elif [[ "$2" == - ]]; then echo "$1"; else
        awk -v a="$1" -v b="$2" 'BEGIN { print (a < b) ? a : b }'; fi
}

# disk_read_limit MIB: MiB/s of dd reading MIB MiB of plain.qcow2, cache dropped.
disk_read_limit() {
    local t0 t1
    drop_cache plain.qcow2
    t0=$(now)
    dd if=plain.qcow2 of=/dev/null bs=1M count="$1" status=none
    t1=$(now)
    awk -v m="$1" -v a="$t0" -v b="$t1" 'BEGIN { print m / (b - a) }'
}

# bench_in WHERE DIR SIZE_MIB: makes the images in DIR and runs every job on them.
bench_in() {
    local where="$1" dir="$2" size_mib="$3"
    local size=$((size_mib << 20))
    cd "$dir"
    printf 'bench-passphrase' > pass.txt
    SECRET="secret,id=sec0,file=$dir/pass.txt"
    SOCK="$dir/nbd.sock"
    echo "$where:$(printf '%*s' $((8 - ${#where})) '')$(describe_dir "$dir"), ${size_mib} MiB disks"
    # qemu-io commands writing 0x5a over the whole disk, 512 MiB at a time.
    local fill=() off len
    for ((off = 0; off < size; off += 512 << 20)); do
        len=$((size - off < 512 << 20 ? size - off : 512 << 20))
        fill+=(-c "write -P 0x5a $off $len")
    done
    # The plain qcow2, fully written.
    qemu-img create -q -f qcow2 plain.qcow2 "$size"
    qemu-io -f qcow2 plain.qcow2 "${fill[@]}" >/dev/null
    # The mission stack: a detached luks header, a qcow2 payload, written through luks.
    "$CRYPTVM" img create -q --object "$SECRET" -f luks \
        -o detached-header=true,key-secret=sec0,iter-time=10 hdr.img
    qemu-img create -q -f qcow2 payload.qcow2 "$size"
    local stack_json="{\"driver\":\"luks\",\"key-secret\":\"sec0\",\"file\":{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"$dir/payload.qcow2\"}},\"header\":{\"driver\":\"file\",\"filename\":\"$dir/hdr.img\"}}"
    local stack_opts="driver=luks,key-secret=sec0,file.driver=qcow2,file.file.filename=$dir/payload.qcow2,header.filename=$dir/hdr.img"
    qemu-io --object "$SECRET" --image-opts "$stack_opts" "${fill[@]}" >/dev/null

    local stride=$((68 << 10))
    local n4k=$(((size - 4096) / stride))
    local n64k=$(((size_mib < 512 ? size_mib : 512) * 16))
    local seq_mib=$((n64k / 16))
    local reps="$REPS"
    [[ "$where" == disk ]] && reps="$DISK_REPS"
    # The disk's limit for 64k sequential reads (none in tmpfs, where a one-thread dd is
    # no limit for requests served by several threads).
    local read_lim=-
    [[ "$where" == disk ]] && read_lim=$(disk_read_limit "$seq_mib")
    local c4k c64k
    c4k=$(awk -v m="$CIPHER_4K" 'BEGIN { print m * 256 }')
    c64k="$CIPHER_64K"

    # workloads STACK CIPHER? FILES OURS... -- THEIRS... --
    workloads() {
        local stack="$1" crypt="$2" files="$3"; shift 3
        local l4k=- l64r="$read_lim" l64w=-
        if [[ "$crypt" == yes ]]; then
            l4k="$c4k"
            l64r=$(min_limit "$read_lim" "$c64k")
            l64w="$c64k"
        fi
        job "$where" "$stack" "4k read strided" IOPS "$n4k" 4096 "$l4k" "$files" "$@" \
            -c "$n4k" -d "$DEPTH" -s 4k -S "$stride"
        job "$where" "$stack" "4k write strided" IOPS "$n4k" 4096 "$l4k" "$files" "$@" \
            -w --pattern=165 -c "$n4k" -d "$DEPTH" -s 4k -S "$stride"
        job "$where" "$stack" "64k read seq" MiB/s "$n64k" 65536 "$l64r" "$files" "$@" \
            -c "$n64k" -d "$DEPTH" -s 64k
        job "$where" "$stack" "64k write seq" MiB/s "$n64k" 65536 "$l64w" "$files" "$@" \
            -w --pattern=165 -c "$n64k" -d "$DEPTH" -s 64k
    }
    local nbd="nbd+unix:///top?socket=$SOCK"
    workloads qcow2 no plain.qcow2 -f qcow2 plain.qcow2 -- -f qcow2 plain.qcow2 --
    # Reference: what NBD costs qemu on the plain qcow2 (cryptvm unchanged, in-process).
    start_daemon "{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"$dir/plain.qcow2\"}}"
    workloads qcow2/nbd no plain.qcow2 -f qcow2 plain.qcow2 -- -f raw "$nbd" --
    stop_daemon
    start_daemon "$stack_json"
    workloads luks/qcow2 yes "payload.qcow2 hdr.img" --object "$SECRET" "json:$stack_json" -- \
        -f raw "$nbd" --
    stop_daemon

    # Both tools wrote the same bytes; qemu checks what is there.
    local img
    for img in plain.qcow2 payload.qcow2; do
        qemu-img check -q -f qcow2 "$img" ||
            { echo "qcow2.sh: qemu-img check finds errors in $where/$img" >&2; exit 1; }
    done
    qemu-io -f qcow2 plain.qcow2 -c "read -P 165 0 4k" -c "read -P 165 $stride 4k" \
        -c "read -P 165 0 64k" | grep -q 'verification failed' &&
        { echo "qcow2.sh: the written pattern does not read back ($where qcow2)" >&2; exit 1; }
    qemu-io --object "$SECRET" --image-opts "$stack_opts" -c "read -P 165 0 64k" \
        -c "read -P 165 $stride 4k" | grep -q 'verification failed' &&
        { echo "qcow2.sh: the written pattern does not read back ($where luks/qcow2)" >&2; exit 1; }
    echo "        4k jobs: $n4k requests; 64k jobs: $n64k requests"
    return 0
}

if [[ -n "$tmpfs_base" ]]; then
    d="$(mktemp -d "$tmpfs_base/cryptvm-bench-qcow2.XXXXXX")"
    DIRS+=("$d")
    bench_in tmpfs "$d" "$SIZE_MIB"
    rm -rf "$d"
else
    echo "tmpfs:  none (/dev/shm is not a writable tmpfs): tmpfs runs skipped"
fi
if [[ -n "$disk" ]]; then
    d="$(mktemp -d "$disk/cryptvm-bench-qcow2.XXXXXX")"
    DIRS+=("$d")
    bench_in disk "$d" "$DISK_SIZE_MIB"
    rm -rf "$d"
else
    echo "disk:   none found (set BENCH_DISK_DIR): disk-backed runs skipped"
fi

echo
printf '%-6s %-11s %-17s %10s %10s %5s %7s %10s %7s\n' "where" "stack" "job" "cryptvm" "qemu" \
    "unit" "ratio" "limit" "c/limit"
printf '%-6s %-11s %-17s %10s %10s %5s %7s %10s %7s\n' "" "" "" "" "" "" "c/q" "" ""
for line in "${rows[@]}"; do
    echo "$line"
done
echo
echo "qcow2/nbd and luks/qcow2: qemu-img bench runs over NBD (qemu-storage-daemon, Unix socket)"
echo "and so pays NBD overhead (qcow2/nbd against qcow2 shows how much); cryptvm runs in-process."
echo "limit: dd reading the same bytes for disk-backed 64k reads, AES-256-XTS alone on every"
echo "core for luks/qcow2 (the lower of the two); c/limit: cryptvm's figure against it."
