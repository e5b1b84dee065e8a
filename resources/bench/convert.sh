#!/usr/bin/env bash
# Benchmark (not a test): `cryptvm img convert` against `qemu-img convert` doing the same
# job on the same 256 MiB images, side by side in one run, next to the machine's limits.
#
#   resources/bench/convert.sh            # builds cryptvm in release mode first
#   CRYPTVM=path/to/cryptvm SIZE_MIB=64 REPS=1 resources/bench/convert.sh
#   BENCH_DISK_DIR=/some/disk/folder resources/bench/convert.sh
#   PLAIN_LUKS=0 resources/bench/convert.sh   # without the plain LUKS1 reference jobs
#
# Where: a tmpfs folder (/dev/shm: the CPU is the limit) and a folder on a real disk
# (BENCH_DISK_DIR, else the cargo target folder, else $TMPDIR or /var/tmp, the first that
# is not tmpfs; `stat -f` says which): the same jobs in both.
#
# The mission stack (luks with a detached header made by QEMU, aes-256-xts-plain64, over
# qcow2 over file), both directions, both tools with their defaults:
#   encrypt+write   raw -> the stack (-n --target-image-opts), into an empty qcow2
#                   (made anew before every run)
#   read+decrypt    the stack (written by qemu-img) -> a new raw file
# In the tmpfs folder also, for reference: cryptvm with -W (out-of-order writes), and
# plain LUKS1 jobs (no qcow2): decrypt attached/detached -> raw, encrypt raw -> detached
# (-n), re-encrypt -> detached (-n), re-encrypt -> new attached image (-O luks, which
# includes PBKDF2 for the new header).
#
# Cache state, the same for every tool and dd: before each timed run the source files
# are written back and their page cache dropped (fsync, then POSIX_FADV_DONTNEED), so
# that in the disk-backed folder the read really reads the disk; outputs are new files
# (or a new qcow2); on tmpfs there is no cache to drop. A completed convert is durable
# (cryptvm flushes at the end; qemu-img, whose convert target cache mode is `unsafe`,
# does not fsync), so the disk's limit is `dd bs=1M conv=fsync` copying the same source
# file into the same folder.
#
# Limits printed next to the figures: the cipher, `openssl speed -evp aes-256-xts` on all
# cores (64 KiB blocks), and dd as above. Goals (issue 10, item 7), each printed with
# "goal met" / "goal NOT met" (the script reports; it does not fail on figures):
#   tmpfs:        the mission stack at >= 5x qemu-img's speed, both directions
#   disk-backed:  the mission stack within 1.1x dd's time, both directions
# Each job runs REPS times per tool (alternating) and the best time counts. Every result
# of cryptvm is checked with `qemu-img compare` against the source.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
SIZE_MIB="${SIZE_MIB:-256}"
REPS="${REPS:-3}"
PLAIN_LUKS="${PLAIN_LUKS:-1}"
# shellcheck source=resources/bench/lib.sh
source "$ROOT/resources/bench/lib.sh"
# shellcheck source=resources/bench/limits.sh
source "$ROOT/resources/bench/limits.sh"

require_tools qemu-img qemu-system-x86_64 python3 openssl dd
release_cryptvm || { echo "convert.sh: cryptvm does not build" >&2; exit 1; }

BYTES=$((SIZE_MIB << 20))
tmpfs_base=/dev/shm
[[ -d "$tmpfs_base" && -w "$tmpfs_base" && "$(fs_type "$tmpfs_base")" == tmpfs ]] || tmpfs_base=""
disk="$(disk_base)"
DIRS=()
cleanup() { if [[ ${#DIRS[@]} -gt 0 ]]; then rm -rf "${DIRS[@]}"; fi; }
trap cleanup EXIT

echo "convert benchmark: ${SIZE_MIB} MiB, best of ${REPS}"
echo "cryptvm:  $CRYPTVM"
echo "qemu-img: $(qemu-img --version | head -1)"
CIPHER_MIBS="$(cipher_limit_mibs 65536)"
echo "cipher:   AES-256-XTS ${CIPHER_MIBS} MiB/s on $(nproc) cores (openssl speed -evp aes-256-xts -bytes 65536 -multi $(nproc))"

# time_convert TOOL ARGS...: seconds `TOOL convert ARGS` took.
time_convert() {
    local tool="$1"; shift
    local t0 t1
    t0=$(now)
    if [[ "$tool" == cryptvm ]]; then
        "$CRYPTVM" img convert "$@" >/dev/null
    else
        qemu-img convert "$@" >/dev/null
    fi
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
}

# same WHAT ARGS...: `qemu-img compare ARGS` must find the images identical.
same() {
    local what="$1"; shift
    qemu-img compare -q "$@" ||
        { echo "convert.sh: cryptvm's output differs from the source ($what)" >&2; exit 1; }
}

rows=()
# row WHERE JOB T_CRYPTVM T_QEMU T_DD GOAL: one line of the table. GOAL: speed (>= 5x
# qemu-img), disk (<= 1.1x dd's time) or none.
row() {
    local where="$1" job="$2" c="$3" q="$4" d="$5" goal="$6" met verdict_text=""
    case "$goal" in
        speed)
            met=$(awk -v c="$c" -v q="$q" 'BEGIN { print (q / c >= 5) ? 1 : 0 }')
            verdict_text="speed >= 5x qemu-img: $(verdict "$met")" ;;
        disk)
            met=$(awk -v c="$c" -v d="$d" 'BEGIN { print (c / d <= 1.1) ? 1 : 0 }')
            verdict_text="time <= 1.1x dd: $(verdict "$met")" ;;
    esac
    rows+=("$(awk -v w="$where" -v n="$job" -v s="$SIZE_MIB" -v c="$c" -v q="$q" -v d="$d" \
        -v x="$CIPHER_MIBS" -v g="$verdict_text" 'BEGIN {
        qs = (q == "-") ? "-" : sprintf("%.0f", s / q); qr = (q == "-") ? "-" : sprintf("%.2fx", q / c)
        ds = (d == "-") ? "-" : sprintf("%.0f", s / d); dr = (d == "-") ? "-" : sprintf("%.2fx", c / d)
        printf "%-6s %-38s %8.0f %8s %6s %8s %8s %7.0f%%  %s", w, n, s / c, qs, ds, qr, dr, 100 * s / c / x, g }')")
}

# mission WHERE DIR: the mission-stack jobs in DIR.
mission() {
    local where="$1" dir="$2"
    local secret="secret,id=sec0,file=$dir/pass.txt" i t tc tq tw td
    cd "$dir"
    printf 'bench-passphrase' > pass.txt
    head -c "$BYTES" /dev/urandom > src.raw
    local raw="driver=raw,file.filename=$dir/src.raw"
    # The source of read+decrypt, written by qemu-img through QEMU's luks driver.
    python3 "$ROOT/resources/scripts/qemu-luks-create.py" --passphrase-file pass.txt \
        --header in.hdr -o iter-time=10
    qemu-img create -q -f qcow2 in.qcow2 "$BYTES"
    local in_stack="driver=luks,key-secret=sec0,file.driver=qcow2,file.file.filename=$dir/in.qcow2,header.filename=$dir/in.hdr"
    qemu-img convert --object "$secret" -n -f raw --target-image-opts src.raw "$in_stack"
    # The target of encrypt+write: this header over a new, empty qcow2 each run.
    python3 "$ROOT/resources/scripts/qemu-luks-create.py" --passphrase-file pass.txt \
        --header out.hdr -o iter-time=10
    local out_stack="driver=luks,key-secret=sec0,file.driver=qcow2,file.file.filename=$dir/out.qcow2,header.filename=$dir/out.hdr"

    # encrypt_once TOOL [FLAGS...]: one timed encrypt+write into a new qcow2.
    encrypt_once() {
        local tool="$1"; shift
        rm -f out.qcow2
        qemu-img create -q -f qcow2 out.qcow2 "$BYTES"
        drop_cache src.raw out.qcow2 out.hdr
        time_convert "$tool" "$@" --object "$secret" -n -f raw --target-image-opts src.raw "$out_stack"
    }
    # decrypt_once TOOL [FLAGS...]: one timed read+decrypt into a new raw file.
    decrypt_once() {
        local tool="$1"; shift
        rm -f new.raw
        drop_cache in.qcow2 in.hdr
        time_convert "$tool" "$@" --object "$secret" --image-opts "$in_stack" -O raw new.raw
    }
    local extra=()
    [[ "$where" == tmpfs ]] && extra=(-W)
    for job in encrypt decrypt; do
        tc="" tq="" tw="" td=""
        for ((i = 0; i < REPS; i++)); do
            t=$("${job}_once" cryptvm)
            if [[ "$job" == encrypt ]]; then
                same "$where encrypt+write" --object "$secret" --image-opts "$raw" "$out_stack"
            else
                same "$where read+decrypt" -f raw -F raw src.raw new.raw
            fi
            if [[ -z "$tc" ]] || less "$t" "$tc"; then tc=$t; fi
            t=$("${job}_once" qemu-img)
            if [[ -z "$tq" ]] || less "$t" "$tq"; then tq=$t; fi
            if [[ ${#extra[@]} -gt 0 ]]; then
                t=$("${job}_once" cryptvm "${extra[@]}")
                if [[ "$job" == encrypt ]]; then
                    same "$where encrypt+write -W" --object "$secret" --image-opts "$raw" "$out_stack"
                else
                    same "$where read+decrypt -W" -f raw -F raw src.raw new.raw
                fi
                if [[ -z "$tw" ]] || less "$t" "$tw"; then tw=$t; fi
            fi
            if [[ "$job" == encrypt ]]; then
                t=$(dd_copy_seconds src.raw dd.out)
            else
                t=$(dd_copy_seconds in.qcow2 dd.out)
            fi
            if [[ -z "$td" ]] || less "$t" "$td"; then td=$t; fi
        done
        local name goal
        if [[ "$job" == encrypt ]]; then name="encrypt+write raw -> luks/qcow2 (-n)"; else
            name="read+decrypt luks/qcow2 -> raw"; fi
        if [[ "$where" == tmpfs ]]; then goal=speed; else goal=disk; fi
        row "$where" "$name" "$tc" "$tq" "$td" "$goal"
        if [[ -n "$tw" ]]; then row "$where" "  the same, cryptvm -W" "$tw" "$tq" "$td" none; fi
    done
    rm -f new.raw out.qcow2
}

# luks_jobs DIR: plain LUKS1 jobs (no qcow2), as references, in DIR (after mission,
# whose src.raw and pass.txt they use).
luks_jobs() {
    local dir="$1" secret="secret,id=sec0,file=$1/pass.txt"
    cd "$dir"
    qemu-img convert --object "$secret" -f raw -O luks -o key-secret=sec0,iter-time=10 \
        src.raw att.luks
    local att="driver=luks,key-secret=sec0,file.filename=$dir/att.luks"
    python3 "$ROOT/resources/scripts/qemu-luks-create.py" --passphrase-file pass.txt \
        --header det.hdr -o iter-time=10
    truncate -s "$BYTES" det.payload
    local det="driver=luks,key-secret=sec0,file.filename=$dir/det.payload,header.filename=$dir/det.hdr"
    qemu-img convert --object "$secret" -n -f raw --target-image-opts src.raw "$det"
    python3 "$ROOT/resources/scripts/qemu-luks-create.py" --passphrase-file pass.txt \
        --header out-plain.hdr -o iter-time=10
    truncate -s "$BYTES" out.payload
    local out="driver=luks,key-secret=sec0,file.filename=$dir/out.payload,header.filename=$dir/out-plain.hdr"
    local raw="driver=raw,file.filename=$dir/src.raw"
    # plain_job NAME CHECK SOURCES ARGS...: times both tools on `convert ARGS`.
    plain_job() {
        local name="$1" check="$2" sources="$3"; shift 3
        local tc="" tq="" t i tool
        for ((i = 0; i < REPS; i++)); do
            for tool in cryptvm qemu-img; do
                rm -f new.raw new.luks
                # shellcheck disable=SC2086
                drop_cache $sources
                t=$(time_convert "$tool" "$@")
                if [[ "$tool" == cryptvm ]]; then
                    case "$check" in
                        raw) same "$name" -f raw -F raw src.raw new.raw ;;
                        out) same "$name" --object "$secret" --image-opts "$raw" "$out" ;;
                        new) same "$name" --object "$secret" --image-opts "$raw" \
                                 "driver=luks,key-secret=sec0,file.filename=$dir/new.luks" ;;
                    esac
                    if [[ -z "$tc" ]] || less "$t" "$tc"; then tc=$t; fi
                elif [[ -z "$tq" ]] || less "$t" "$tq"; then tq=$t; fi
            done
        done
        rm -f new.raw new.luks
        row tmpfs "$name" "$tc" "$tq" - none
    }
    plain_job "decrypt luks (attached) -> raw" raw att.luks \
        --object "$secret" --image-opts "$att" -O raw new.raw
    plain_job "decrypt luks (detached) -> raw" raw "det.payload det.hdr" \
        --object "$secret" --image-opts "$det" -O raw new.raw
    plain_job "encrypt raw -> luks (detached, -n)" out src.raw \
        --object "$secret" -n -f raw --target-image-opts src.raw "$out"
    plain_job "reencrypt luks -> luks (detached, -n)" out att.luks \
        --object "$secret" -n --image-opts --target-image-opts "$att" "$out"
    plain_job "reencrypt luks -> new luks (-O luks)" new att.luks \
        --object "$secret" --image-opts "$att" -O luks -o key-secret=sec0,iter-time=10 new.luks
}

if [[ -n "$tmpfs_base" ]]; then
    d="$(mktemp -d "$tmpfs_base/cryptvm-bench-convert.XXXXXX")"
    DIRS+=("$d")
    echo "tmpfs:    $(describe_dir "$d")"
    mission tmpfs "$d"
    if [[ "$PLAIN_LUKS" != 0 ]]; then
        luks_jobs "$d"
    fi
    rm -rf "$d"
else
    echo "tmpfs:    none (/dev/shm is not a writable tmpfs): tmpfs runs skipped"
fi
if [[ -n "$disk" ]]; then
    d="$(mktemp -d "$disk/cryptvm-bench-convert.XXXXXX")"
    DIRS+=("$d")
    echo "disk:     $(describe_dir "$d")"
    mission disk "$d"
    rm -rf "$d"
else
    echo "disk:     none found (set BENCH_DISK_DIR): disk-backed runs skipped"
fi

echo
printf '%-6s %-38s %8s %8s %6s %8s %8s %8s  %s\n' "where" "job (${SIZE_MIB} MiB)" "cryptvm" \
    "qemu-img" "dd" "speed" "time" "of the" "goal"
printf '%-6s %-38s %8s %8s %6s %8s %8s %8s\n' "" "" "MiB/s" "MiB/s" "MiB/s" "c/qemu" "c/dd" "cipher"
for line in "${rows[@]}"; do
    echo "$line"
done
echo
echo "speed c/qemu: cryptvm's speed over qemu-img's; time c/dd: cryptvm's time over dd's"
echo "(dd bs=1M conv=fsync of the same source file, cache dropped); of the cipher: cryptvm's"
echo "speed against AES-256-XTS alone on every core (${CIPHER_MIBS} MiB/s)."
