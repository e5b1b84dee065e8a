#!/usr/bin/env bash
# The whole test suite: the README's test command, and what .ci/run runs.
#
#   resources/scripts/test.sh
#
# rustfmt and clippy (warnings denied), every unit and integration test of the workspace
# (tests/interop, tests/functional, tests/security run the real peer tools: qemu-img,
# qemu-io, qemu-system-x86_64, cryptsetup, openssl, python3; with CI=true a missing tool
# fails its tests, elsewhere they are skipped with a note), then the fuzz smoke test
# (resources/scripts/fuzz-smoke.sh: every cargo-fuzz target of fuzz/ built once and run
# FUZZ_SECS=10 s on its seeds; a crash, timeout or OOM fails the suite), then the
# benchmarks (resources/bench/cipher.sh, convert.sh, qcow2.sh, boot.sh, disk.sh,
# hotplug.sh), whose figures are printed, not judged. FUZZ=0 skips the fuzz smoke test,
# BENCH=0 the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/../.."

echo "== cargo fmt --all --check"
cargo fmt --all --check

echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

echo "== module cycles in vmm/src (resources/scripts/module-deps.py)"
resources/scripts/module-deps.py --check

echo "== cargo test --workspace ($SECONDS s so far)"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# Totals over every test binary ("test result: ok. 12 passed; 0 failed; ...").
passed=$(sed -n 's/^test result: .* \([0-9][0-9]*\) passed; .*/\1/p' "$log" | awk '{ s += $1 } END { print s + 0 }')
failed=$(sed -n 's/^test result: .* \([0-9][0-9]*\) failed; .*/\1/p' "$log" | awk '{ s += $1 } END { print s + 0 }')
if [[ $status -ne 0 || $failed -ne 0 ]]; then
    echo "cargo test failed (exit status $status)"
    echo "tests: $passed passed, $failed failed"
    exit 1
fi

if [[ "${FUZZ:-1}" != 0 ]]; then
    echo "== resources/scripts/fuzz-smoke.sh ($SECONDS s so far)"
    FUZZ_SECS="${FUZZ_SECS:-10}" resources/scripts/fuzz-smoke.sh
fi

# A benchmark that fails is named and the others still run; the suite then fails. One
# whose emulated test host failed (exit status 75, resources/bench/lib.sh) runs once more.
# `bench SCRIPT [VAR=VALUE...]` runs SCRIPT with those settings in its environment.
bench_failed=()
bench() {
    local status=0 started=$SECONDS
    echo "== resources/bench/$1 ${*:2}"
    env "${@:2}" "resources/bench/$1" || status=$?
    if [[ $status -eq 75 ]]; then
        echo "resources/bench/$1: the test host failed; once more"
        status=0
        env "${@:2}" "resources/bench/$1" || status=$?
    fi
    if [[ $status -ne 0 ]]; then
        echo "resources/bench/$1 failed (exit status $status)"
        bench_failed+=("$1")
    fi
    echo "resources/bench/$1: $((SECONDS - started)) s"
}
if [[ "${BENCH:-1}" != 0 ]]; then
    # The suite's budget is 30 minutes: cipher.sh, qcow2.sh, disk.sh and hotplug.sh run
    # fewer repetitions than their defaults here, convert.sh without its plain LUKS1
    # reference jobs; run them alone for the full figures.
    bench cipher.sh REPS=3
    bench convert.sh PLAIN_LUKS=0
    bench qcow2.sh SIZE_MIB=1024 REPS=2
    bench boot.sh
    bench disk.sh REPS=1
    bench hotplug.sh ROUNDS=4
fi

echo "tests: $passed passed, $failed failed ($SECONDS s in all)"
if [[ ${#bench_failed[@]} -ne 0 ]]; then
    echo "benchmarks failed: ${bench_failed[*]}"
    exit 1
fi
