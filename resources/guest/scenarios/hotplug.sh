# Scenario "hotplug": the guest's side of QMP disk hotplug (tests/e2e/hotplug.rs,
# resources/bench/hotplug.sh). The guest boots with no disk; a driver outside (QMP
# device_add / device_del) watches these console lines and acts on them. For each round
# R of HP_ROUNDS:
#   CRYPTVM-HP ready round=R                 polling for /dev/vda (the driver hot-adds it)
#   CRYPTVM-HP seen round=R dev=vda sectors=N waited=S
#                                            /dev/vda appeared: no rescan by hand, the
#                                            kernel's ACPI PCI hotplug found it
#   ... hp_io's own lines ...
#   CRYPTVM-HP io-done round=R rc=N          hp_io R returned N (the driver unplugs now)
#   CRYPTVM-HP gone round=R                  /dev/vda went away (the kernel ejected it)
# and first `CRYPTVM-HP boot disks=N` (block devices vd* at boot), last
# `CRYPTVM-HP end failed=N`. Waits give up after HP_WAIT seconds (`CRYPTVM-HP timeout
# round=R what=...`), and the scenario's status is then non-zero.
#
# After the end line the guest stays up for HP_LINGER seconds: the driver finishes its
# side (DEVICE_DELETED, blockdev-del, object-del: QEMU sends the device's DEVICE_DELETED
# only after the guest's eject has completed, which a guest powering off at once can
# cut short) and then ends the VM with QMP `quit`. Only when that never comes does the
# guest power off by itself.
#
# A test's own /scenario.sh may set HP_ROUNDS, HP_WAIT and HP_LINGER, define `hp_io
# ROUND` (the disk's I/O for a round; default: read its first 4 KiB with O_DIRECT) and
# then source this file (`. /scenarios/hotplug.sh`). Otherwise hp.rounds=N, hp.wait=S and
# hp.linger=S on the kernel command line set them (defaults 1, 60 and 30).
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        hp.rounds=*) : "${HP_ROUNDS:=${arg#hp.rounds=}}" ;;
        hp.wait=*) : "${HP_WAIT:=${arg#hp.wait=}}" ;;
        hp.linger=*) : "${HP_LINGER:=${arg#hp.linger=}}" ;;
    esac
done
: "${HP_ROUNDS:=1}" "${HP_WAIT:=60}" "${HP_LINGER:=30}"

if ! command -v hp_io >/dev/null 2>&1; then
    hp_io() {
        dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null
    }
fi

# hp_wait present|absent: polls (2 ms) until /dev/vda is there or gone; prints the
# seconds waited; status 1 after HP_WAIT seconds.
hp_wait() {
    read -r w0 _ </proc/uptime
    while :; do
        if [ "$1" = present ]; then
            [ -b /dev/vda ] && break
        else
            [ -e /sys/block/vda ] || [ -b /dev/vda ] || break
        fi
        read -r w1 _ </proc/uptime
        if [ "${w1%.*}" -ge $((${w0%.*} + HP_WAIT)) ]; then
            echo "$w0 $w1" | awk '{ printf "%.2f\n", $2 - $1 }'
            return 1
        fi
        usleep 2000
    done
    read -r w1 _ </proc/uptime
    echo "$w0 $w1" | awk '{ printf "%.2f\n", $2 - $1 }'
}

hp_failed=0
echo "CRYPTVM-HP boot disks=$(ls -d /sys/block/vd* 2>/dev/null | wc -l)"
round=1
while [ $round -le "$HP_ROUNDS" ]; do
    echo "CRYPTVM-HP ready round=$round"
    if ! waited=$(hp_wait present); then
        echo "CRYPTVM-HP timeout round=$round what=appear waited=$waited"
        hp_failed=$((hp_failed + 1))
        break
    fi
    echo "CRYPTVM-HP seen round=$round dev=vda sectors=$(cat /sys/block/vda/size 2>/dev/null) waited=$waited"
    hp_io $round
    rc=$?
    [ $rc = 0 ] || hp_failed=$((hp_failed + 1))
    echo "CRYPTVM-HP io-done round=$round rc=$rc"
    if ! waited=$(hp_wait absent); then
        echo "CRYPTVM-HP timeout round=$round what=remove waited=$waited"
        hp_failed=$((hp_failed + 1))
        break
    fi
    echo "CRYPTVM-HP gone round=$round waited=$waited"
    round=$((round + 1))
done
echo "CRYPTVM-HP end failed=$hp_failed"
sleep "$HP_LINGER"
echo "CRYPTVM-HP linger-expired seconds=$HP_LINGER"
[ $hp_failed = 0 ]
