#!/usr/bin/env bash
# Runs `cryptvm run ARGS...` inside the nested QEMU TCG test host (resources/testhost),
# for machines whose /dev/kvm is a software KVM (no vmx/svm): the guest's console is
# shown as it is written, and the script exits with cryptvm's exit status.
#
#   resources/scripts/run-nested.sh [OPTIONS] [--] CRYPTVM-RUN-ARGS...
#   resources/scripts/run-nested.sh --config vm.json
#   resources/scripts/run-nested.sh --kernel vmlinuz --initrd initrd.img --cpus 2
#
#   --file PATH       carry one more host file into the test host (repeatable)
#   --cryptvm PATH    the cryptvm binary to run (default: the release build,
#                     ${CARGO_TARGET_DIR:-target}/release/cryptvm; built when missing)
#   --time-limit S    the test host is killed after S seconds (default 600); exit 124
#   --list-files      print the host files that would be carried (one a line), and exit
#   -h, --help        this text
#
# Every file the arguments name is carried at its own absolute path, so paths mean the
# same inside as outside (relative ones too: cryptvm runs from the same folder): the
# values of --kernel, --initrd and --config, of `filename=`/`file=` keys in --blockdev,
# --object and --device, and in the config file every "kernel", "initrd", "filename" and
# "file" string (resolved against its folder) that names an existing file. Anything else:
# --file. The test host keeps the files in RAM (2 GiB with the guest's memory), and what
# the guest writes to its disks stays there: the host's copies are left unchanged.
# Needs qemu-system-x86_64, python3, and what resources/testhost/pack.sh needs.
# Output: the guest's console (stdout) and cryptvm's stderr, between two lines of this
# script's own on stderr. Exit status: cryptvm's, 124 when --time-limit passed, 125 when
# the test host failed before cryptvm ended.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
log() { echo "run-nested.sh: $*" >&2; }
usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit "${1:-0}"
}

extra=() args=() cryptvm='' limit=600 list=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --file) extra+=("$2"); shift 2 ;;
        --cryptvm) cryptvm=$2; shift 2 ;;
        --time-limit) limit=$2; shift 2 ;;
        --list-files) list=1; shift ;;
        -h|--help) usage 0 ;;
        --) shift; args+=("$@"); break ;;
        *) args+=("$1"); shift ;;
    esac
done
[[ ${#args[@]} -gt 0 ]] || { log "no cryptvm run arguments"; usage 2 >&2; }
command -v python3 >/dev/null || { log "python3 is not installed"; exit 1; }

if [[ $list -eq 0 && -z "$cryptvm" ]]; then
    cryptvm="${CARGO_TARGET_DIR:-$ROOT/target}/release/cryptvm"
    if [[ ! -x "$cryptvm" ]]; then
        log "building cryptvm (cargo build --release; the first time takes ~5 min)..."
        cargo build --release --manifest-path "$ROOT/Cargo.toml" -p vmm
    fi
fi
[[ $list -eq 1 || -x "$cryptvm" ]] || { log "no cryptvm binary at $cryptvm"; exit 1; }

# The host files the arguments name, as absolute paths (one a line).
files=$(python3 - "${args[@]}" <<'PY'
import json, os, sys

args = sys.argv[1:]
found = []

def add(path, base=None):
    if not isinstance(path, str) or not path or path.startswith("json:"):
        return
    p = path if os.path.isabs(path) or base is None else os.path.join(base, path)
    if os.path.isfile(p):
        found.append(os.path.abspath(p))

def walk(value, base):
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("kernel", "initrd", "filename", "file") and isinstance(v, str):
                add(v, base)
            else:
                walk(v, base)
    elif isinstance(value, list):
        for v in value:
            walk(v, base)

i = 0
while i < len(args):
    a = args[i]
    if a.startswith("--") and "=" in a:
        opt, val = a.split("=", 1)
    elif a.startswith("--") and i + 1 < len(args):
        opt, val = a, args[i + 1]
        i += 1
    else:
        i += 1
        continue
    i += 1
    if opt in ("--kernel", "--initrd"):
        add(val)
    elif opt == "--config":
        add(val)
        try:
            with open(val) as f:
                walk(json.load(f), os.path.dirname(os.path.abspath(val)))
        except (OSError, ValueError) as e:
            print(f"run-nested.sh: reading {val}: {e}", file=sys.stderr)
    elif opt in ("--blockdev", "--object", "--device"):
        if val.lstrip().startswith("{"):
            try:
                walk(json.loads(val), None)
            except ValueError:
                pass
        else:
            for kv in val.split(","):
                k, _, v = kv.partition("=")
                if k in ("filename", "file"):
                    add(v)
for p in dict.fromkeys(found):
    print(p)
PY
)
carry=()
while IFS= read -r f; do
    [[ -n "$f" ]] && carry+=(--file "$f=$f")
done <<<"$files"
for f in "${extra[@]}"; do
    [[ -e "$f" ]] || { log "--file $f: no such file"; exit 1; }
    abs="$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"
    grep -qxF -- "$abs" <<<"$files" && continue
    files+=$'\n'"$abs"
    carry+=(--file "$abs=$abs")
done
if [[ $list -eq 1 ]]; then
    for ((i = 1; i < ${#carry[@]}; i += 2)); do echo "${carry[i]%%=*}"; done
    exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/cryptvm-nested.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# L1's /work/run.sh: cryptvm from the same folder, its console and stderr on L1's console
# between two markers, its status last.
quoted=$(printf ' %q' "${args[@]}")
cat >"$work/run.sh" <<RUN
#!/bin/sh
mkdir -p $(printf %q "$PWD") && cd $(printf %q "$PWD") || exit 1
echo "CRYPTVM-NESTED-BEGIN"
/usr/local/bin/cryptvm run$quoted </dev/null 2>&1
rc=\$?
echo "CRYPTVM-NESTED-END rc=\$rc"
RUN

log "packing the test host: cryptvm and $((${#carry[@]} / 2)) files..."
eval "$("$ROOT/resources/testhost/pack.sh" --out "$work/l1.img" --bin "$cryptvm" \
    "${carry[@]}" --run "$work/run.sh" | grep -E '^L1_(KERNEL|INITRD)=')"

log "booting the test host (QEMU TCG, ~30 s), then: cryptvm run$quoted"
console="$work/console.txt"
: >"$console"
set +e
"$ROOT/resources/testhost/launch.sh" --kernel "$L1_KERNEL" --initrd "$L1_INITRD" \
    --console "$console" --timeout "$limit" &
launcher=$!
# The guest's part of L1's console, as it is written: from the begin marker on, without
# L1's heartbeat; a console that launch.sh boots again starts over (tail -F). tail ends
# once launch.sh has.
tail -n +1 -F --pid="$launcher" "$console" 2>/dev/null | sed -u \
    -e 's/\r$//' -e 's/CRYPTVM-L1-ALIVE//g' \
    -e '/CRYPTVM-NESTED-BEGIN/,/CRYPTVM-NESTED-END/!d' \
    -e '/^CRYPTVM-NESTED-BEGIN/d' -e '/^CRYPTVM-NESTED-END/d' -e '/^$/d'
wait "$launcher"
launched=$?
set -e

rc=$(tr -d '\r' <"$console" | sed -n 's/.*CRYPTVM-NESTED-END rc=\([0-9]*\).*/\1/p' | tail -1)
if [[ -n "$rc" ]]; then
    log "cryptvm exit status: $rc"
    exit "$rc"
fi
if [[ $launched -eq 124 ]]; then
    log "the test host was killed after --time-limit $limit s"
    exit 124
fi
log "the test host ended (status $launched) before cryptvm did; its console's end:"
tr -d '\r' <"$console" | grep -v CRYPTVM-L1-ALIVE | tail -20 >&2
exit 125
