#!/usr/bin/env bash
# Extracts the ELF vmlinux from an x86 bzImage.
#
#   resources/guest/extract-vmlinux.sh BZIMAGE OUT
#
# The setup header says where the compressed kernel is: setup_sects (byte 0x1f1) gives the
# size of the real-mode part, (setup_sects + 1) * 512 bytes; payload_offset (u32 at 0x248)
# and payload_length (u32 at 0x24c) locate the payload inside the protected-mode part. Its
# first bytes name the compressor (Debian's 6.1 kernels use LZ4, legacy frame format); the
# build appends the decompressed size as a little-endian u32, which is checked here. The
# result must be an ELF executable; its PVH entry note (Xen note type 18) is reported.
set -eu

if [ $# -ne 2 ]; then
    echo "usage: $0 BZIMAGE OUT" >&2
    exit 2
fi
bz=$1
out=$2

u8() { od -An -tu1 -j "$1" -N1 "$bz" | tr -d ' '; }
u32() { od -An -tu4 -j "$1" -N4 "$bz" | tr -d ' '; }

if [ "$(od -An -c -j $((0x202)) -N4 "$bz" | tr -d ' ')" != HdrS ]; then
    echo "$bz: not a bzImage (no HdrS setup header)" >&2
    exit 1
fi
setup_sects=$(u8 $((0x1f1)))
[ "$setup_sects" -eq 0 ] && setup_sects=4
payload_offset=$(u32 $((0x248)))
payload_length=$(u32 $((0x24c)))
start=$(((setup_sects + 1) * 512 + payload_offset))

tmp="$out.tmp.$$"
trap 'rm -f "$tmp" "$tmp.payload"' EXIT
tail -c +$((start + 1)) "$bz" | head -c "$payload_length" >"$tmp.payload"
expected=$(tail -c 4 "$tmp.payload" | od -An -tu4 | tr -d ' ')

magic=$(od -An -tx1 -N6 "$tmp.payload" | tr -d ' ')
case "$magic" in
    02214c18*) tool="lz4 -dc" ;;
    1f8b*) tool="gzip -dc" ;;
    fd377a585a00) tool="xz -dc" ;;
    28b52ffd*) tool="zstd -dc" ;;
    5d0000*) tool="xz --format=lzma -dc" ;;
    425a68*) tool="bzip2 -dc" ;;
    894c5a4f*) tool="lzop -dc" ;;
    *)
        echo "$bz: unknown compression (payload starts with $magic)" >&2
        exit 1
        ;;
esac
command -v "${tool%% *}" >/dev/null || {
    echo "$0: ${tool%% *} is needed to decompress this kernel" >&2
    exit 1
}
# The decompressors stop at (or complain about) the trailing size word; the size check
# below is what decides success.
$tool <"$tmp.payload" >"$tmp" 2>/dev/null || true
size=$(wc -c <"$tmp")
if [ "$size" -ne "$expected" ]; then
    echo "$bz: decompressed $size bytes with '$tool', the image says $expected" >&2
    exit 1
fi
if [ "$(od -An -c -N4 "$tmp" | tr -d ' ')" != '177ELF' ]; then
    echo "$bz: the payload is not an ELF file" >&2
    exit 1
fi
mv "$tmp" "$out"
pvh=no
if command -v readelf >/dev/null && readelf -n "$out" 2>/dev/null | grep -q 'Xen.*(0x00000012)'; then
    pvh=yes
fi
echo "extract-vmlinux: $out: ELF, $size bytes, ${tool%% *}-compressed payload, PVH note: $pvh" >&2
