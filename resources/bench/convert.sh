#!/usr/bin/env bash
# Benchmark (not a test): `cryptvm img convert` against `qemu-img convert` doing the same
# job on the same 256 MiB LUKS images, side by side in one run.
#
#   resources/bench/convert.sh            # builds cryptvm in release mode first
#   CRYPTVM=path/to/cryptvm SIZE_MIB=64 REPS=1 resources/bench/convert.sh
#
# Jobs (LUKS1, QEMU's defaults: aes-256-xts-plain64, sha256):
#   decrypt   luks (attached header)  -> new raw file
#   decrypt   luks (detached header)  -> new raw file
#   encrypt   raw                     -> existing luks stack, detached header (-n)
#   reencrypt luks (attached)         -> existing luks stack, detached header (-n)
#   reencrypt luks (attached)         -> new attached luks image (-O luks; includes the
#                                        PBKDF2 set-up of the new header)
# Each job runs REPS times per tool (alternating) and the best time counts. Every result
# of cryptvm is checked with `qemu-img compare` against the source, so the benchmark
# also shows that cryptvm decrypts and re-encrypts a 256 MiB image correctly.
# Images come from qemu-img / QEMU (iter-time 10 ms), in a tmpfs folder removed on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
SIZE_MIB="${SIZE_MIB:-256}"
REPS="${REPS:-3}"

for tool in qemu-img qemu-system-x86_64 python3; do
    command -v "$tool" >/dev/null || { echo "convert.sh: $tool is not installed" >&2; exit 1; }
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
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

printf 'bench-passphrase' > pass.txt
SECRET="secret,id=sec0,file=$WORK/pass.txt"
BYTES=$((SIZE_MIB << 20))

echo "convert benchmark: ${SIZE_MIB} MiB, best of ${REPS}, in $WORK"
echo "cryptvm:  $CRYPTVM"
echo "qemu-img: $(qemu-img --version | head -1)"

# Source data (not compressible, not zero: both tools must encrypt every byte).
head -c "$BYTES" /dev/urandom > src.raw
# Attached luks image made by qemu-img.
qemu-img convert --object "$SECRET" -f raw -O luks -o key-secret=sec0,iter-time=10 \
    src.raw att.luks
ATT="driver=luks,key-secret=sec0,file.filename=$WORK/att.luks"
# Detached header made by QEMU (blockdev-create), payload written by qemu-img.
python3 "$ROOT/resources/scripts/qemu-luks-create.py" --passphrase-file pass.txt \
    --header det.hdr -o iter-time=10
truncate -s "$BYTES" det.payload
DET="driver=luks,key-secret=sec0,file.filename=$WORK/det.payload,header.filename=$WORK/det.hdr"
qemu-img convert --object "$SECRET" -n -f raw --target-image-opts src.raw "$DET"
# Target of the -n jobs.
python3 "$ROOT/resources/scripts/qemu-luks-create.py" --passphrase-file pass.txt \
    --header out.hdr -o iter-time=10
truncate -s "$BYTES" out.payload
OUT="driver=luks,key-secret=sec0,file.filename=$WORK/out.payload,header.filename=$WORK/out.hdr"
RAW="driver=raw,file.filename=$WORK/src.raw"

now() { date +%s.%N; }
less() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }

# time_one TOOL ARGS... : runs `TOOL convert ARGS` and prints the seconds it took.
time_one() {
    local tool="$1"; shift
    local t0 t1
    rm -f new.raw new.luks
    t0=$(now)
    if [[ "$tool" == cryptvm ]]; then
        "$CRYPTVM" img convert "$@" >/dev/null
    else
        qemu-img convert "$@" >/dev/null
    fi
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
}

# verify KIND : checks cryptvm's output of the last job with qemu-img compare.
verify() {
    case "$1" in
        raw)  qemu-img compare -q -f raw -F raw src.raw new.raw ;;
        out)  qemu-img compare -q --object "$SECRET" --image-opts "$RAW" "$OUT" ;;
        new)  qemu-img compare -q --object "$SECRET" --image-opts "$RAW" \
                  "driver=luks,key-secret=sec0,file.filename=$WORK/new.luks" ;;
    esac || { echo "convert.sh: cryptvm's output differs from the source ($1)" >&2; exit 1; }
}

results=()
# job NAME CHECK ARGS... : times both tools on `convert ARGS`.
job() {
    local name="$1" check="$2"; shift 2
    local best_c="" best_q="" t i
    for ((i = 0; i < REPS; i++)); do
        t=$(time_one cryptvm "$@")
        verify "$check"
        if [[ -z "$best_c" ]] || less "$t" "$best_c"; then best_c=$t; fi
        t=$(time_one qemu-img "$@")
        if [[ -z "$best_q" ]] || less "$t" "$best_q"; then best_q=$t; fi
    done
    rm -f new.raw new.luks
    results+=("$(awk -v n="$name" -v s="$SIZE_MIB" -v c="$best_c" -v q="$best_q" 'BEGIN {
        printf "%-44s %10.1f %10.1f %8.2f", n, s / c, s / q, (s / c) / (s / q) }')")
}

job "decrypt luks (attached) -> raw" raw \
    --object "$SECRET" --image-opts "$ATT" -O raw new.raw
job "decrypt luks (detached header) -> raw" raw \
    --object "$SECRET" --image-opts "$DET" -O raw new.raw
job "encrypt raw -> luks (detached, -n)" out \
    --object "$SECRET" -n -f raw --target-image-opts src.raw "$OUT"
job "reencrypt luks -> luks (detached, -n)" out \
    --object "$SECRET" -n --image-opts --target-image-opts "$ATT" "$OUT"
job "reencrypt luks -> new luks (-O luks)" new \
    --object "$SECRET" --image-opts "$ATT" -O luks -o key-secret=sec0,iter-time=10 new.luks

echo
printf '%-44s %10s %10s %8s\n' "job (${SIZE_MIB} MiB)" "cryptvm" "qemu-img" "ratio"
printf '%-44s %10s %10s %8s\n' "" "MiB/s" "MiB/s" "c/q"
for line in "${results[@]}"; do
    echo "$line"
done
