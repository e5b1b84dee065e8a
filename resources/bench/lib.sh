# Shared by the benchmarks that boot guests in the L1 test host (boot.sh, disk.sh,
# hotplug.sh); sourced after ROOT is set.

# require_tools TOOL...: fails, naming the calling script, unless every TOOL is on PATH.
require_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null ||
            { echo "$(basename "$0"): $tool is not installed" >&2; exit 1; }
    done
}

# release_cryptvm: sets CRYPTVM to a release build of this tree unless it is already
# set; fails when cryptvm does not build.
release_cryptvm() {
    [[ -n "${CRYPTVM:-}" ]] && return 0
    (cd "$ROOT" && cargo build --release --quiet -p vmm --bin cryptvm) || return 1
    local target_dir
    target_dir="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    CRYPTVM="$target_dir/release/cryptvm"
}

# bench_workdir NAME: a fresh work folder in $WORK, removed on exit unless KEEP=1.
bench_workdir() {
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/cryptvm-bench-$1.XXXXXX")"
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "$1.sh: keeping $WORK" >&2
    else
        trap 'rm -rf "$WORK"' EXIT
    fi
}

# run_test_host NAME OUT_DIR TIMEOUT RESULT: boots the packed L1 test host ($L1_KERNEL,
# $L1_INITRD) once, its results in OUT_DIR; when L1 fails (after launch.sh's own retries)
# or leaves no OUT_DIR/RESULT, exits with status 75 (EX_TEMPFAIL: the emulated test host
# failed, not the code measured) after its console's tail.
run_test_host() {
    if ! "$ROOT/resources/testhost/launch.sh" --kernel "$L1_KERNEL" --initrd "$L1_INITRD" \
        --console "$WORK/console.txt" --out-dir "$2" --timeout "$3" || [[ ! -f "$2/$4" ]]; then
        echo "$1.sh: the test host failed or left no results:" >&2
        grep -v "TCG doesn't support" "$WORK/console.txt" | tail -20 >&2
        exit 75
    fi
}
