# Shared by the benchmarks that boot guests in the L1 test host (boot.sh, disk.sh,
# hotplug.sh); sourced after ROOT is set.

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
