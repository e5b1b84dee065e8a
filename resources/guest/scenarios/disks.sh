# Scenario "disks": lists the virtio block devices the guest sees, with their sizes.
for d in /sys/block/vd*; do
    [ -e "$d" ] || continue
    echo "CRYPTVM-DISK $(basename "$d") sectors=$(cat "$d/size") ro=$(cat "$d/ro")"
done
