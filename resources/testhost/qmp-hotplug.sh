#!/bin/sh
# Hot-adds and removes a LUKS disk with a detached header over QMP with `cryptvm ctl`,
# against cryptvm or QEMU: the driver of tests/e2e/hotplug.rs and resources/bench/hotplug.sh
# (it runs inside the L1 test host, next to the VMM; busybox sh or any POSIX sh).
#
#   CRYPTVM_CTL='cryptvm ctl --socket /tmp/qmp.sock' CRYPTVM_CONSOLE=/out/l2-console.txt \
#   CRYPTVM_FILES=/work/files [HP_ROUNDS=2] [CRYPTVM_OUT=/out] [CRYPTVM_VMM_PID=PID] \
#   sh qmp-hotplug.sh
#
# The guest runs the "hotplug" scenario (resources/guest/scenarios/hotplug.sh) and prints
# `CRYPTVM-HP ready|seen|io-done|gone round=R` lines on its console (CRYPTVM_CONSOLE, the
# file the VMM writes it to). Once the guest is up, ONE `cryptvm ctl` connection (QEMU's
# socket serves one client at a time) carries, for each round R of HP_ROUNDS:
#
# 1. after `ready round=R`, the seven commands of QEMU's "Add LUKS volume to a VM with a
#    detached header" (docs/devel/luks-detached-header.rst), one secret id throughout:
#    object-add secret; blockdev-add file + raw (header), file + qcow2 (payload), luks
#    with `header`; device_add virtio-blk-pci;
# 2. the time from device_add's reply to the guest's `seen round=R` line (/proc/uptime,
#    10 ms; the console is polled every 10 ms);
# 3. after `io-done round=R`: device_del, a wait for DEVICE_DELETED of the device,
#    blockdev-del of the luks, qcow2, raw and both file nodes, object-del; then the
#    guest's `gone round=R`;
#
# and after the guest's `CRYPTVM-HP end failed=0`, `quit`.
#
# Files: $HP_DIR/disk.header and $HP_DIR/disk.qcow2 (HP_DIR: $CRYPTVM_FILES), the
# passphrase in $HP_SECRET_FILE ($HP_DIR/pass.txt; sent as the secret's `data`).
# Prints one line per round, `HOTPLUG round=R latency_s=S add_s=S del_s=S` (add_s: the
# seven commands; del_s: device_del to DEVICE_DELETED), then `HOTPLUG done`; every
# request and reply goes to $CRYPTVM_OUT/qmp-transcript.txt (`-> ` and `<- ` lines).
# Exit status 0 when every step succeeded; otherwise 1 (`HOTPLUG failed: ...`), after
# sending `quit` so that the run does not wait for the guest's time limits.
set -u

: "${CRYPTVM_CTL:?}" "${CRYPTVM_CONSOLE:?}"
HP_DIR=${HP_DIR:-${CRYPTVM_FILES:?}}
HP_SECRET_FILE=${HP_SECRET_FILE:-$HP_DIR/pass.txt}
HP_ROUNDS=${HP_ROUNDS:-2}
HP_TIMEOUT=${HP_TIMEOUT:-60}
OUT=${CRYPTVM_OUT:-.}
TRANSCRIPT=$OUT/qmp-transcript.txt
SECRET=libvirt-4-format-secret
DEVICE=virtio-disk2
T=$(mktemp -d "${TMPDIR:-/tmp}/qmp-hotplug.XXXXXX")
: >"$TRANSCRIPT"

now() { read -r up _ </proc/uptime; echo "$up"; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f\n", a - b }'; }

connected=0
fail() {
    echo "HOTPLUG failed: $*"
    if [ $connected = 1 ]; then
        echo '{"execute": "quit"}' >&3
        IFS= read -r reply <&4 && echo "<- $reply" >>"$TRANSCRIPT"
    fi
    [ -s "$T/ctl.err" ] && echo "cryptvm ctl: $(cat "$T/ctl.err")"
    rm -rf "$T"
    exit 1
}

# vmm_alive: whether the VMM (CRYPTVM_VMM_PID, when given) still runs (a zombie does not).
vmm_alive() {
    [ -z "${CRYPTVM_VMM_PID:-}" ] && return 0
    state=Z
    [ -r "/proc/$CRYPTVM_VMM_PID/stat" ] && read -r _ _ state _ <"/proc/$CRYPTVM_VMM_PID/stat"
    [ "$state" != Z ]
}

# wait_console MARKER [POLL]: until a console line contains MARKER (HP_TIMEOUT seconds;
# fails at once when the VMM has exited), looking every POLL seconds (0.01).
wait_console() {
    w0=$(now) poll=${2:-0.01}
    until grep -q "$1" "$CRYPTVM_CONSOLE" 2>/dev/null; do
        [ "$(sub "$(now)" "$w0" | cut -d. -f1)" -ge "$HP_TIMEOUT" ] &&
            fail "no '$1' on the guest console after $HP_TIMEOUT s"
        vmm_alive || grep -q "$1" "$CRYPTVM_CONSOLE" 2>/dev/null ||
            fail "the VMM exited before '$1' appeared on the guest console"
        sleep "$poll"
    done
}

# qmp REQUEST: sends one line to ctl and reads the line it prints back into $reply;
# status 1 when that is not a success reply (or the event a wait-event asked for).
qmp() {
    echo "-> $1" >>"$TRANSCRIPT"
    echo "$1" >&3
    if ! IFS= read -r reply <&4; then
        echo "<- (ctl ended: $(cat "$T/ctl.err" 2>/dev/null))" >>"$TRANSCRIPT"
        connected=0
        fail "no reply to $1"
    fi
    echo "<- $reply" >>"$TRANSCRIPT"
    case "$reply" in
        *'"return"'* | *'"event"'*) return 0 ;;
        *) return 1 ;;
    esac
}
must() { qmp "$1" || fail "error reply to $1: $reply"; }

add_disk() {
    must "{\"execute\": \"object-add\", \"arguments\": {\"qom-type\": \"secret\", \"id\": \"$SECRET\", \"data\": \"$(cat "$HP_SECRET_FILE")\"}}"
    must "{\"execute\": \"blockdev-add\", \"arguments\": {\"node-name\": \"libvirt-1-storage\", \"driver\": \"file\", \"filename\": \"$HP_DIR/disk.header\"}}"
    must '{"execute": "blockdev-add", "arguments": {"node-name": "libvirt-1-format", "driver": "raw", "file": "libvirt-1-storage"}}'
    must "{\"execute\": \"blockdev-add\", \"arguments\": {\"node-name\": \"libvirt-2-storage\", \"driver\": \"file\", \"filename\": \"$HP_DIR/disk.qcow2\"}}"
    must '{"execute": "blockdev-add", "arguments": {"node-name": "libvirt-2-format", "driver": "qcow2", "file": "libvirt-2-storage"}}'
    must "{\"execute\": \"blockdev-add\", \"arguments\": {\"node-name\": \"libvirt-3-format\", \"driver\": \"luks\", \"file\": \"libvirt-2-format\", \"header\": \"libvirt-1-format\", \"key-secret\": \"$SECRET\"}}"
    must "{\"execute\": \"device_add\", \"arguments\": {\"driver\": \"virtio-blk-pci\", \"drive\": \"libvirt-3-format\", \"id\": \"$DEVICE\"}}"
}

remove_disk() {
    must "{\"execute\": \"device_del\", \"arguments\": {\"id\": \"$DEVICE\"}}"
    must "{\"wait-event\": \"DEVICE_DELETED\", \"timeout\": 30, \"data\": {\"device\": \"$DEVICE\"}}"
    del_done=$(now)
    for node in libvirt-3-format libvirt-2-format libvirt-1-format libvirt-2-storage \
        libvirt-1-storage; do
        must "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": \"$node\"}}"
    done
    must "{\"execute\": \"object-del\", \"arguments\": {\"id\": \"$SECRET\"}}"
}

# The VMM listens once the guest runs; one connection from here on. (While the guest
# boots, the console is looked at ten times a second only: this host is the VMM's too.)
wait_console "CRYPTVM-HP ready round=1" 0.1
mkfifo "$T/in" "$T/out"
$CRYPTVM_CTL <"$T/in" >"$T/out" 2>"$T/ctl.err" &
exec 3>"$T/in" 4<"$T/out"
connected=1
must '{"execute": "query-version"}'
echo "VMM: $reply"

r=1
while [ $r -le "$HP_ROUNDS" ]; do
    wait_console "CRYPTVM-HP ready round=$r"
    t0=$(now)
    add_disk
    t1=$(now)
    wait_console "CRYPTVM-HP seen round=$r"
    t2=$(now)
    wait_console "CRYPTVM-HP io-done round=$r"
    t3=$(now)
    remove_disk
    echo "HOTPLUG round=$r latency_s=$(sub "$t2" "$t1") add_s=$(sub "$t1" "$t0") del_s=$(sub "$del_done" "$t3")"
    wait_console "CRYPTVM-HP gone round=$r"
    r=$((r + 1))
done
# (A first digit is enough: 0 is the only count that starts with 0.)
wait_console "CRYPTVM-HP end failed=[0-9]"
grep -q "CRYPTVM-HP end failed=0" "$CRYPTVM_CONSOLE" ||
    fail "the guest reported failures: $(grep 'CRYPTVM-HP end' "$CRYPTVM_CONSOLE")"
echo "HOTPLUG done"
qmp '{"execute": "quit"}'
exec 3>&-
wait
rm -rf "$T"
exit 0
