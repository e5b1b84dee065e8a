# Scenario "diskbench": the guest workload of resources/bench/disk.sh.
# For each disk whose serial is bench-NAME: sequential 1 MiB writes, sequential 1 MiB
# reads, random 4 KiB writes, random 4 KiB reads, all O_DIRECT over the whole disk, each
# for SECONDS, sequential from SEQJOBS threads and random from RANDJOBS threads (each
# thread keeps one request in flight): `cryptvm.bench=SECONDS,SEQJOBS,RANDJOBS` on the
# kernel command line (3,1,4 when absent). Lines:
#   BENCH-INFO clocksource=... disks=...
#   BENCH-BEGIN disk=NAME workload=W
#   BENCH-RESULT disk=NAME workload=W BLKIO op=... mbps=... iops=... errors=...
secs=3 seqjobs=1 randjobs=4
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        cryptvm.bench=*)
            set -- $(echo "${arg#cryptvm.bench=}" | tr , ' ')
            secs=${1:-$secs} seqjobs=${2:-$seqjobs} randjobs=${3:-$randjobs}
            ;;
    esac
done
n=0
while [ "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" -lt 1 ] && [ $n -lt 50 ]; do
    sleep 0.1; n=$((n + 1))
done
sleep 0.5
disks=
for d in /sys/block/vd*; do
    [ -e "$d" ] || continue
    s=$(cat "$d/serial" 2>/dev/null)
    case "$s" in bench-*) disks="$disks ${s#bench-}:${d##*/}" ;; esac
done
echo "BENCH-INFO clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource) secs=$secs seqjobs=$seqjobs randjobs=$randjobs disks=$(echo $disks | tr ' ' ,)"
[ -n "$disks" ] || { echo "BENCH-INFO no bench-* disks"; exit 1; }
rc=0
for entry in $disks; do
    name=${entry%%:*} dev=${entry#*:}
    echo "BENCH-INFO disk=$name dev=$dev sectors=$(cat /sys/block/$dev/size) queues=$(ls /sys/block/$dev/mq 2>/dev/null | wc -l)"
    for w in seqwrite:write:seq:1m:$seqjobs seqread:read:seq:1m:$seqjobs \
        randwrite:write:rand:4k:$randjobs randread:read:rand:4k:$randjobs; do
        set -- $(echo "$w" | tr : ' ')
        echo "BENCH-BEGIN disk=$name workload=$1"
        out=$(blkio bench "/dev/$dev" "$2" "$3" "$4" "$secs" "$5" 2>&1) || rc=1
        echo "BENCH-RESULT disk=$name workload=$1 $(echo $out)"
    done
done
exit $rc
