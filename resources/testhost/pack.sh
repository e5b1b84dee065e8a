#!/usr/bin/env bash
# Packs an L1 test host initramfs: what a VMM needs to boot the test guest inside the
# QEMU TCG test host (see launch.sh).
#
#   resources/testhost/pack.sh --out l1.img [--qemu] [--bin PATH]... [--guest]
#       [--file SRC=DEST]... [--run SCRIPT]
#
#   --qemu          carry qemu-system-x86_64, its libraries and firmware (-L not needed)
#   --bin PATH      carry an executable as /usr/local/bin/NAME, with every library `ldd`
#                   lists and the dynamic loader (debug info stripped)
#   --guest         carry the test guest (resources/guest/build.sh) as /work/guest/vmlinuz,
#                   /work/guest/vmlinux, /work/guest/initramfs.cpio.gz
#   --guest-kernel bzimage|elf|both   which guest kernel files --guest carries (both)
#   --net           carry virtio_net and its dependencies (failover, net_failover), taken
#                   from the kernel package (apt-get download, cached): L1's /init then
#                   brings up eth0 as 10.0.2.15/24 (QEMU user networking; launch.sh --hostfwd)
#   --file SRC=DEST carry a file; DEST is relative to /work unless absolute
#   --run SCRIPT    /work/run.sh, which L1's /init runs (results go into /out)
#
# The result is a concatenation of uncompressed newc cpio archives (the kernel unpacks
# each in turn): the base (busybox, the kvm and virtio modules, /init), a cached QEMU
# layer, and this run's files. Prints L1_KERNEL=PATH and L1_INITRD=PATH.
# Cache: ${CRYPTVM_CACHE:-$HOME/.cache/cryptvm}/testhost/.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${CRYPTVM_CACHE:-${HOME:-/root}/.cache/cryptvm}/testhost"
log() { echo "testhost/pack.sh: $*" >&2; }
usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

out='' qemu=0 net=0 guest=0 guest_kernel=both run=''
bins=() files=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --qemu) qemu=1; shift ;;
        --net) net=1; shift ;;
        --bin) bins+=("$2"); shift 2 ;;
        --guest) guest=1; shift ;;
        --guest-kernel) guest_kernel=$2; shift 2 ;;
        --file) files+=("$2"); shift 2 ;;
        --run) run=$2; shift 2 ;;
        -h|--help) usage ;;
        *) log "unknown argument $1"; usage ;;
    esac
done
[[ -n "$out" ]] || usage
for tool in cpio ldd flock; do
    command -v "$tool" >/dev/null || { log "$tool is not installed"; exit 1; }
done

# The guest build gives the kernel (L1 boots the same one), the modules and busybox.
eval "$("$ROOT/resources/guest/build.sh" | sed 's/^/G_/')"
mkdir -p "$CACHE"

# cpio_dir DIR OUT: an uncompressed newc archive of DIR's contents, owned by root.
cpio_dir() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 >"$2")
}

# copy_with_libs STAGE BINARY DEST: BINARY at STAGE/DEST, its libraries and the loader
# at their own absolute paths.
copy_with_libs() {
    local stage=$1 bin=$2 dest=$3 lib
    mkdir -p "$stage/$(dirname "$dest")"
    # Debug info only costs L1 memory and unpacking time (not an ELF file: copied as is).
    if ! command -v objcopy >/dev/null ||
        ! objcopy --strip-debug "$bin" "$stage/$dest" 2>/dev/null; then
        cp -L "$bin" "$stage/$dest"
    fi
    chmod 0755 "$stage/$dest"
    for lib in $(ldd "$bin" 2>/dev/null | awk '/=> \// { print $3 } /^[ \t]*\// { print $1 }'); do
        mkdir -p "$stage/$(dirname "$lib")"
        [[ -e "$stage/$lib" ]] || cp -L "$lib" "$stage/$lib"
    done
}

exec 9>"$CACHE/.lock"
flock 9

# --- base: busybox, modules, /init --------------------------------------------------
key=$({
    echo "$G_KERNEL_PACKAGE $G_BUSYBOX"
    cat "$HERE/init"
} | sha256sum | cut -c1-16)
base="$CACHE/base-$key.cpio"
if [[ ! -f "$base" ]]; then
    stage=$(mktemp -d "$CACHE/stage.XXXXXX")
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,dev,proc,sys,tmp,run,out,work,root}
    mkdir -p "$stage/lib/modules"
    cp "$G_BUSYBOX" "$stage/bin/busybox"
    "$G_BUSYBOX" --list-full | while read -r applet; do
        [[ "$applet" == bin/busybox ]] || ln -sf /bin/busybox "$stage/$applet"
    done
    for m in irqbypass kvm kvm-amd virtio_ring virtio virtio_pci_modern_dev \
        virtio_pci_legacy_dev virtio_pci virtio_blk; do
        cp "$G_MODULES/$m.ko" "$stage/lib/modules/"
    done
    install -m 0755 "$HERE/init" "$stage/init"
    cpio_dir "$stage" "$base.tmp"
    mv "$base.tmp" "$base"
    rm -rf "$stage"
    log "built $base"
    ls -t "$CACHE"/base-*.cpio | tail -n +4 | xargs -r rm -f
fi

# --- QEMU layer: binary, libraries, firmware ----------------------------------------
layers=("$base")
if [[ $qemu -eq 1 ]]; then
    qbin=$(command -v qemu-system-x86_64) || { log "qemu-system-x86_64 is not installed"; exit 1; }
    qkey=$(stat -L -c '%s %Y' "$qbin" | cksum | cut -d' ' -f1)
    qlayer="$CACHE/qemu-$qkey.cpio"
    if [[ ! -f "$qlayer" ]]; then
        stage=$(mktemp -d "$CACHE/stage.XXXXXX")
        copy_with_libs "$stage" "$qbin" /usr/bin/qemu-system-x86_64
        # Firmware for -M pc and -M microvm: SeaBIOS, qboot, the option ROMs that
        # -kernel uses (linuxboot_dma for a bzImage, pvh for an ELF vmlinux), VGA BIOS.
        # (Debian's QEMU looks in /usr/share/qemu and /usr/share/seabios.)
        for dir in /usr/share/qemu /usr/share/seabios; do
            mkdir -p "$stage$dir"
            for f in bios-256k.bin bios.bin bios-microvm.bin qboot.rom linuxboot.bin \
                linuxboot_dma.bin pvh.bin multiboot.bin multiboot_dma.bin kvmvapic.bin \
                vgabios.bin vgabios-stdvga.bin efi-virtio.rom; do
                [[ -e $dir/$f ]] && cp -L "$dir/$f" "$stage$dir/$f"
            done
        done
        [[ -d /usr/share/qemu/keymaps ]] && cp -rL /usr/share/qemu/keymaps "$stage/usr/share/qemu/"
        cpio_dir "$stage" "$qlayer.tmp"
        mv "$qlayer.tmp" "$qlayer"
        rm -rf "$stage"
        log "built $qlayer ($(du -m "$qlayer" | cut -f1) MiB)"
        ls -t "$CACHE"/qemu-*.cpio | tail -n +3 | xargs -r rm -f
    fi
    layers+=("$qlayer")
fi

# --- network layer: virtio_net for L1's user-mode network (launch.sh --hostfwd) -------
if [[ $net -eq 1 ]]; then
    nlayer="$CACHE/net-$G_KERNEL_PACKAGE.cpio"
    if [[ ! -f "$nlayer" ]]; then
        stage=$(mktemp -d "$CACHE/stage.XXXXXX")
        # _apt cannot write into root's cache; download as root without the sandbox.
        (cd "$stage" && apt-get download -qq -o APT::Sandbox::User=root \
            "${G_KERNEL_PACKAGE%_*}=${G_KERNEL_PACKAGE##*_}" >&2)
        dpkg-deb -x "$stage"/*.deb "$stage/x"
        mkdir -p "$stage/l/lib/modules"
        for m in failover net_failover virtio_net; do
            ko=$(find "$stage/x/lib/modules" \( -name "$m.ko" -o -name "$m.ko.xz" \) | head -1)
            [[ -n "$ko" ]] || { log "module $m is not in $G_KERNEL_PACKAGE"; rm -rf "$stage"; exit 1; }
            case "$ko" in
                *.xz) xz -dc "$ko" >"$stage/l/lib/modules/$m.ko" ;;
                *) cp "$ko" "$stage/l/lib/modules/$m.ko" ;;
            esac
        done
        cpio_dir "$stage/l" "$nlayer.tmp"
        mv "$nlayer.tmp" "$nlayer"
        rm -rf "$stage"
        log "built $nlayer"
        ls -t "$CACHE"/net-*.cpio | tail -n +3 | xargs -r rm -f
    fi
    layers+=("$nlayer")
fi
flock -u 9

# --- this run's files ---------------------------------------------------------------
stage=$(mktemp -d "${TMPDIR:-/tmp}/cryptvm-l1-stage.XXXXXX")
trap 'rm -rf "$stage" "$stage.cpio"' EXIT
mkdir -p "$stage/work" "$stage/usr/local/bin"
for b in "${bins[@]}"; do
    copy_with_libs "$stage" "$b" "/usr/local/bin/$(basename "$b")"
done
if [[ $guest -eq 1 ]]; then
    mkdir -p "$stage/work/guest"
    cp "$G_INITRAMFS" "$stage/work/guest/initramfs.cpio.gz"
    case "$guest_kernel" in
        bzimage) cp "$G_VMLINUZ" "$stage/work/guest/vmlinuz" ;;
        elf) cp "$G_VMLINUX" "$stage/work/guest/vmlinux" ;;
        both) cp "$G_VMLINUZ" "$stage/work/guest/vmlinuz"
              cp "$G_VMLINUX" "$stage/work/guest/vmlinux" ;;
        *) log "--guest-kernel: bzimage, elf or both"; exit 2 ;;
    esac
fi
for spec in "${files[@]}"; do
    src=${spec%%=*}
    dest=${spec#*=}
    [[ "$dest" == /* ]] || dest=/work/$dest
    mkdir -p "$stage/$(dirname "$dest")"
    cp -L "$src" "$stage/$dest"
done
[[ -n "$run" ]] && install -m 0755 "$run" "$stage/work/run.sh"
cpio_dir "$stage" "$stage.cpio"
layers+=("$stage.cpio")

cat "${layers[@]}" >"$out.tmp"
rm -f "$stage.cpio"
mv "$out.tmp" "$out"
echo "L1_KERNEL=$G_VMLINUZ"
echo "L1_INITRD=$out"
