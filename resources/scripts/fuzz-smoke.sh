#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target of fuzz/ once (release, with debug
# assertions and overflow checks), makes the seed corpora (fuzz/seeds.sh: qemu-img,
# qemu-io, cryptsetup, python3), then runs each target for FUZZ_SECS seconds
# (default 30), FUZZ_JOBS at a time (default: one per CPU), with -rss_limit_mb=2048
# -timeout=10. Fails naming every target that crashed, timed out or ran out of
# memory (its input is kept in the scratch folder, whose path is printed); prints
# executions and corpus size per target.
#
#   resources/scripts/fuzz-smoke.sh                    # all targets, 30 s each
#   FUZZ_SECS=10 resources/scripts/fuzz-smoke.sh qcow2 luks1 luks2
#
# Toolchain: `cargo +nightly` when rustup has a nightly toolchain (AddressSanitizer
# on); otherwise the default (stable) toolchain with RUSTC_BOOTSTRAP=1, which
# cargo-fuzz's -Z flags need, also with AddressSanitizer unless FUZZ_SANITIZER says
# otherwise (`none`); FUZZ_TOOLCHAIN=stable picks the latter even where nightly is
# installed. cargo-fuzz is installed (`cargo install cargo-fuzz --locked`)
# if missing. FUZZ_TARGET_DIR: the fuzz crate's target folder (default fuzz/target).
# FUZZ_KEEP=1 keeps the scratch folder (corpora, logs) even when all passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
secs="${FUZZ_SECS:-30}"
target_dir="${FUZZ_TARGET_DIR:-$root/fuzz/target}"
start=$(date +%s)

if [[ "${FUZZ_TOOLCHAIN:-}" != stable ]] && command -v rustup >/dev/null 2>&1 \
    && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    cargo=(cargo +nightly)
    channel=nightly
else
    cargo=(cargo)
    channel="$(rustc --version) with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
fi
sanitizer="${FUZZ_SANITIZER:-address}"
# libfuzzer-sys compiles libFuzzer (C++). As for the other peer tools: missing on CI
# is a failure, elsewhere the smoke test is skipped with a note.
if ! command -v "${CXX:-c++}" >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 \
    && ! command -v clang++ >/dev/null 2>&1; then
    if [[ "${CI:-}" == true ]]; then
        echo "fuzz-smoke.sh: no C++ compiler (c++, g++ or clang++) to build libFuzzer" >&2
        exit 1
    fi
    echo "fuzz-smoke.sh: no C++ compiler to build libFuzzer; skipped" >&2
    exit 0
fi
if ! "${cargo[@]}" fuzz --version >/dev/null 2>&1; then
    echo "== cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
fi

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(cd fuzz && "${cargo[@]}" fuzz list)
fi

echo "== cargo fuzz build -O -a -s $sanitizer ($channel)"
(cd fuzz && "${cargo[@]}" fuzz build -O -a -s "$sanitizer" --target-dir "$target_dir")
host="$(rustc -vV | sed -n 's/^host: //p')"
bin_dir="$target_dir/$host/release"

scratch="$(mktemp -d "${TMPDIR:-/tmp}/cryptvm-fuzz.XXXXXX")"
echo "== fuzz/seeds.sh $scratch/seeds"
fuzz/seeds.sh "$scratch/seeds"

# One target's run; its verdict goes to $scratch/$t.summary (and .failed when it failed).
run_target() {
    local t=$1 corpus="$scratch/corpus/$1" artifacts="$scratch/artifacts/$1" log="$scratch/$1.log"
    local status=0 execs size kind
    mkdir -p "$corpus" "$artifacts" "$scratch/seeds/$t"
    # A hang that libFuzzer's own -timeout cannot end (a deadlock outside an input) is
    # ended here.
    timeout -k 10 $((secs * 2 + 120)) "$bin_dir/$t" "$corpus" "$scratch/seeds/$t" \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    size=$(find "$corpus" -type f | wc -l)
    if [[ $status -ne 0 ]]; then
        kind=$(grep -oE 'ERROR: libFuzzer: [a-z-]+|deadly signal|panicked at|ERROR: AddressSanitizer: [a-z-]+|ERROR: LeakSanitizer' "$log" | head -1 || true)
        { tail -40 "$log"
          echo "$t FAILED (exit status $status${kind:+: $kind}); input: $(ls "$artifacts" | head -1)"
        } >"$scratch/$t.failed"
        printf '%-18s FAILED  %s\n' "$t" "${kind:-exit status $status}" >"$scratch/$t.summary"
    else
        printf '%-18s %10s execs  corpus %5s\n' "$t" "${execs:-?}" "$size" >"$scratch/$t.summary"
    fi
}

# Targets run FUZZ_JOBS at a time (default: one per CPU); each is single-threaded.
jobs="${FUZZ_JOBS:-$(nproc)}"
for t in "${targets[@]}"; do
    while [[ $(jobs -rp | wc -l) -ge $jobs ]]; do
        wait -n || true
    done
    echo "== $t: ${secs} s"
    run_target "$t" &
done
wait

failed=()
summary=()
for t in "${targets[@]}"; do
    if [[ -f "$scratch/$t.failed" ]]; then
        cat "$scratch/$t.failed"
        failed+=("$t")
    fi
    summary+=("$(cat "$scratch/$t.summary" 2>/dev/null || echo "$t: no verdict")")
done

echo "== fuzz smoke: ${secs} s per target, $(($(date +%s) - start)) s in all"
printf '%s\n' "${summary[@]}"
if [[ ${#failed[@]} -ne 0 ]]; then
    echo "fuzz targets failed: ${failed[*]} (inputs and logs in $scratch)"
    exit 1
fi
if [[ "${FUZZ_KEEP:-0}" == 1 ]]; then
    echo "corpora and logs in $scratch"
else
    rm -rf "$scratch"
fi
