#!/usr/bin/env bash
# Builds the cryptvm test guest from Debian packages (apt-get download; no other network).
#
#   resources/guest/build.sh            # prints KEY=VALUE lines: the paths of the results
#   CRYPTVM_CACHE=/some/dir resources/guest/build.sh
#
# Into ${CRYPTVM_CACHE:-$HOME/.cache/cryptvm}/guest/ (outside git; work already done is
# skipped, keyed by package version and by the inputs' hash):
#   kernel-<package>_<version>/vmlinuz     bzImage of linux-image-cloud-amd64's kernel
#   kernel-<package>_<version>/vmlinux     ELF kernel extracted from it (PVH entry note)
#   kernel-<package>_<version>/modules/    virtio, virtio_blk, irqbypass, kvm, kvm-amd .ko
#   initramfs-<hash>.cpio.gz               busybox-static + virtio modules + init + scenarios
#                                          + /bin/blkio (blkio.c, built with cc -static)
#   vmlinuz, vmlinux, initramfs.cpio.gz,   links to the newest of the above
#   modules, guest.env                     (guest.env holds the KEY=VALUE lines printed)
#
# The guest's /init is resources/guest/init; resources/guest/scenarios/NAME.sh is baked in
# as /scenarios/NAME.sh and runs when the kernel command line says cryptvm.scenario=NAME.
# Host tools: apt-get, dpkg-deb, cpio, gzip, lz4 (the kernel's compressor), flock, cc.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${CRYPTVM_CACHE:-${HOME:-/root}/.cache/cryptvm}/guest"
mkdir -p "$CACHE"
log() { echo "guest/build.sh: $*" >&2; }

for tool in apt-get apt-cache dpkg-deb cpio gzip lz4 flock; do
    command -v "$tool" >/dev/null || {
        log "$tool is not installed (Debian packages: apt, dpkg, cpio, gzip, lz4, util-linux)"
        exit 1
    }
done

# One build at a time (tests run in parallel and all call this script).
exec 9>"$CACHE/.lock"
flock 9

# Modules kept from the kernel package: the guest's virtio stack (in load order) and what
# the L1 test host needs for /dev/kvm.
GUEST_MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"
HOST_MODULES="irqbypass kvm kvm-amd kvm-intel"

candidate() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p'; }

# Package names and versions; `apt-get update` once when the lists do not know them.
# apt-cache takes ~0.5 s a call: the answers are kept while the package lists are unchanged.
lists_stamp() { ls -l --time-style=+%s /var/lib/apt/lists/ 2>/dev/null | cksum | cut -d' ' -f1; }
resolve() {
    meta_version=$(candidate linux-image-cloud-amd64)
    if [[ -z "$meta_version" || "$meta_version" == "(none)" ]]; then
        log "apt lists do not know linux-image-cloud-amd64; running apt-get update"
        apt-get update -qq >&2 || log "apt-get update failed"
        meta_version=$(candidate linux-image-cloud-amd64)
    fi
    if [[ -z "$meta_version" || "$meta_version" == "(none)" ]]; then
        # Offline with no package lists: reuse the newest build in the cache.
        if [[ -f "$CACHE/guest.env" ]]; then
            log "no package lists; using the cached guest"
            cat "$CACHE/guest.env"
            exit 0
        fi
        log "cannot find linux-image-cloud-amd64 in the apt lists"
        exit 1
    fi
    kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: *\(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -1)
    kernel_version=$(candidate "$kernel_pkg")
    busybox_version=$(candidate busybox-static)
    [[ -n "$kernel_pkg" && -n "$kernel_version" && -n "$busybox_version" ]] || {
        log "cannot resolve the kernel package ($kernel_pkg $kernel_version) or busybox-static"
        exit 1
    }
}
stamp=$(lists_stamp)
if [[ -f "$CACHE/resolved" ]] && [[ "$(head -1 "$CACHE/resolved")" == "$stamp" ]]; then
    read -r kernel_pkg kernel_version busybox_version < <(tail -1 "$CACHE/resolved")
else
    resolve
    printf '%s\n%s %s %s\n' "$(lists_stamp)" "$kernel_pkg" "$kernel_version" \
        "$busybox_version" >"$CACHE/resolved"
fi

# download PACKAGE VERSION -> prints the .deb's path
download() {
    local dir="$CACHE/debs/$1_${2//:/%3a}" deb
    mkdir -p "$dir"
    deb=$(ls "$dir"/*.deb 2>/dev/null | head -1 || true)
    if [[ -z "$deb" ]]; then
        log "apt-get download $1=$2"
        # _apt cannot write into root's cache; download as root without the sandbox.
        (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$1=$2" >&2)
        deb=$(ls "$dir"/*.deb | head -1)
    fi
    echo "$deb"
}

# --- kernel -------------------------------------------------------------------------
kdir="$CACHE/kernel-${kernel_pkg}_${kernel_version}"
if [[ ! -f "$kdir/.done" ]]; then
    deb=$(download "$kernel_pkg" "$kernel_version")
    rm -rf "$kdir" "$kdir.tmp"
    mkdir -p "$kdir.tmp/x" "$kdir.tmp/modules"
    dpkg-deb -x "$deb" "$kdir.tmp/x"
    cp "$kdir.tmp/x"/boot/vmlinuz-* "$kdir.tmp/vmlinuz"
    cp "$kdir.tmp/x"/boot/config-* "$kdir.tmp/config"
    release=$(basename "$(ls -d "$kdir.tmp/x"/lib/modules/*)")
    for m in $GUEST_MODULES $HOST_MODULES; do
        ko=$(find "$kdir.tmp/x/lib/modules/$release" \( -name "$m.ko" -o -name "$m.ko.xz" \
            -o -name "$m.ko.zst" \) | head -1)
        [[ -n "$ko" ]] || { log "module $m is not in $kernel_pkg"; exit 1; }
        case "$ko" in
            *.xz) xz -dc "$ko" >"$kdir.tmp/modules/$m.ko" ;;
            *.zst) zstd -qdc "$ko" >"$kdir.tmp/modules/$m.ko" ;;
            *) cp "$ko" "$kdir.tmp/modules/$m.ko" ;;
        esac
    done
    echo "$release" >"$kdir.tmp/release"
    rm -rf "$kdir.tmp/x"
    "$HERE/extract-vmlinux.sh" "$kdir.tmp/vmlinuz" "$kdir.tmp/vmlinux"
    touch "$kdir.tmp/.done"
    mv "$kdir.tmp" "$kdir"
    rm -rf "$(dirname "$deb")"
fi
release=$(cat "$kdir/release")

# --- busybox ------------------------------------------------------------------------
bbdir="$CACHE/busybox-${busybox_version#*:}"
if [[ ! -x "$bbdir/busybox" ]]; then
    deb=$(download busybox-static "$busybox_version")
    rm -rf "$bbdir.tmp"
    mkdir -p "$bbdir.tmp"
    dpkg-deb -x "$deb" "$bbdir.tmp/x"
    cp "$bbdir.tmp/x/bin/busybox" "$bbdir.tmp/busybox"
    "$bbdir.tmp/busybox" --list-full >"$bbdir.tmp/applets"
    rm -rf "$bbdir.tmp/x" "$bbdir"
    mv "$bbdir.tmp" "$bbdir"
    rm -rf "$(dirname "$deb")"
fi

# --- initramfs ----------------------------------------------------------------------
# Keyed by everything that goes in: init, scenarios, busybox, kernel, this script.
key=$({
    echo "$kernel_pkg $kernel_version $busybox_version $GUEST_MODULES"
    cat "$HERE/init" "$HERE/build.sh" "$HERE/blkio.c"
    for f in "$HERE"/scenarios/*.sh; do echo "$f"; cat "$f"; done
} | sha256sum | cut -c1-16)
initramfs="$CACHE/initramfs-$key.cpio.gz"
if [[ ! -f "$initramfs" ]]; then
    stage=$(mktemp -d "$CACHE/stage.XXXXXX")
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,lib/modules,scenarios}
    cp "$bbdir/busybox" "$stage/bin/busybox"
    while read -r applet; do
        [[ "$applet" == bin/busybox ]] && continue
        ln -sf /bin/busybox "$stage/$applet"
    done <"$bbdir/applets"
    for m in $GUEST_MODULES; do cp "$kdir/modules/$m.ko" "$stage/lib/modules/"; done
    install -m 0755 "$HERE/init" "$stage/init"
    # /bin/blkio (blkio.c): BLKZEROOUT, BLKDISCARD and timed O_DIRECT I/O, which busybox
    # lacks; static, so that it needs nothing else in the guest.
    if ${CC:-cc} -static -O2 -s -pthread -o "$stage/bin/blkio" "$HERE/blkio.c" 2>"$stage/cc.err"; then
        rm -f "$stage/cc.err"
    else
        log "cannot build blkio.c (a C compiler with static libc: gcc, libc6-dev): $(head -3 "$stage/cc.err")"
        rm -f "$stage/cc.err" "$stage/bin/blkio"
    fi
    for f in "$HERE"/scenarios/*.sh; do install -m 0644 "$f" "$stage/scenarios/"; done
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0 | gzip -9n >"$initramfs.tmp")
    mv "$initramfs.tmp" "$initramfs"
    log "built $initramfs ($(wc -c <"$initramfs") bytes)"
    # Keep the three newest initramfs builds.
    ls -t "$CACHE"/initramfs-*.cpio.gz | tail -n +4 | xargs -r rm -f
fi

ln -sfn "$(basename "$kdir")/vmlinuz" "$CACHE/vmlinuz"
ln -sfn "$(basename "$kdir")/vmlinux" "$CACHE/vmlinux"
ln -sfn "$(basename "$kdir")/modules" "$CACHE/modules"
ln -sfn "$(basename "$initramfs")" "$CACHE/initramfs.cpio.gz"
cat >"$CACHE/guest.env.tmp" <<EOF
GUEST_DIR=$CACHE
KERNEL_PACKAGE=${kernel_pkg}_$kernel_version
KERNEL_RELEASE=$release
VMLINUZ=$kdir/vmlinuz
VMLINUX=$kdir/vmlinux
MODULES=$kdir/modules
BUSYBOX=$bbdir/busybox
INITRAMFS=$initramfs
EOF
mv "$CACHE/guest.env.tmp" "$CACHE/guest.env"
cat "$CACHE/guest.env"
