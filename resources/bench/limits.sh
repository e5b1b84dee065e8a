# Shared by convert.sh and qcow2.sh (sourced after ROOT is set): the folders they run
# in, the cache state of a timed run, and the physical limits they print next to the
# figures of cryptvm and its peer.

# fs_type DIR: the file system type of DIR (tmpfs, ext2/ext3, xfs, ...).
fs_type() { stat -f -c %T "$1"; }

# disk_base: prints a folder on a real disk (not tmpfs or ramfs) for the disk-backed
# runs: $BENCH_DISK_DIR if set, else the cargo target folder, else $TMPDIR, /var/tmp;
# prints nothing when none is disk-backed.
disk_base() {
    local target_dir d
    target_dir="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    for d in "${BENCH_DISK_DIR:-}" "$target_dir" "${TMPDIR:-}" /var/tmp; do
        [[ -n "$d" && -d "$d" && -w "$d" ]] || continue
        case "$(fs_type "$d")" in
            tmpfs | ramfs) ;;
            *) echo "$d"; return 0 ;;
        esac
    done
}

# describe_dir DIR: "DIR (fs type, device)".
describe_dir() {
    echo "$1 ($(fs_type "$1"), $(df --output=source "$1" | tail -1))"
}

# drop_cache FILE...: writes back and then drops the page cache of each file (fsync,
# then posix_fadvise POSIX_FADV_DONTNEED), so that the next read of it comes from its
# disk. On tmpfs the pages are the file itself and stay (nothing to drop).
drop_cache() {
    python3 - "$@" <<'PY'
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
PY
}

# now: seconds since the epoch, with nanoseconds.
now() { date +%s.%N; }

# less A B: whether A < B (decimal numbers).
less() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }

# cipher_limit_mibs BYTES: AES-256-XTS throughput of this machine in MiB/s, all cores
# (openssl speed -evp aes-256-xts -multi NPROC, BYTES per block, 1 s).
cipher_limit_mibs() {
    local cores kbs
    cores="$(nproc)"
    kbs="$(openssl speed -evp aes-256-xts -bytes "$1" -seconds 1 -multi "$cores" 2>/dev/null |
        awk '/^AES-256-XTS/ { v = $2 } END { sub(/k$/, "", v); print v }')"
    awk -v k="$kbs" 'BEGIN { printf "%.0f\n", k * 1000 / 1048576 }'
}

# dd_copy_seconds SRC DST: seconds for `dd if=SRC of=DST bs=1M conv=fsync` with SRC's
# cache dropped first and DST new, the disk's limit for copying SRC's bytes; DST is
# removed afterwards.
dd_copy_seconds() {
    local t0 t1
    rm -f "$2"
    drop_cache "$1"
    t0=$(now)
    dd if="$1" of="$2" bs=1M conv=fsync status=none
    t1=$(now)
    rm -f "$2"
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
}

# verdict MET: "goal met" or "goal NOT met" (benchmarks report, they do not fail).
verdict() { if [[ "$1" == 1 ]]; then echo "goal met"; else echo "goal NOT met"; fi; }
