#!/usr/bin/env bash
# Makes the seed corpora of the fuzz targets, one folder per target, with the
# real peers where there is one: qemu-img and qemu-io (qcow2 images), cryptsetup
# (LUKS1 headers, passphrase "fuzz"), and python3 (QMP messages from
# vmm/src/qmp/tests.rs, config files, virtio-blk descriptor chains).
#
#   fuzz/seeds.sh DIR      # DIR/qcow2, DIR/luks1, DIR/qmp_lexer, ...
#
# Nothing binary is committed: the seeds are made at run time. A missing peer
# leaves its target with the seeds the others can make (and a note); libFuzzer
# also starts from an empty corpus.
set -euo pipefail
out="${1:?usage: fuzz/seeds.sh DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
for t in qcow2 luks1 luks2 qmp_lexer qmp_parser qmp_dispatch config virtio_blk_chain; do
    mkdir -p "$out/$t"
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
have() { command -v "$1" >/dev/null 2>&1; }

# --- qcow2: [n ops][n x 8-byte ops][image] (fuzz_targets/qcow2.rs) ---
# No operations, or a write, read, discard, write-zeroes, flush and check.
ops_none='\x00'
ops_some='\x06\x02\x00\x00\x00\x00\x08\x00\x11\x00\x00\x00\x00\x00\x10\x00\x00\x05\x01\x00\x00\x00\x04\x00\x00\x04\x10\x00\x00\x00\x02\x00\x00\x06\x00\x00\x00\x00\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00'
qcow2_seed() { # NAME SIZE, then qemu-img create options
    local name="$1" size="$2"
    shift 2
    qemu-img create -q -f qcow2 "$@" "$work/$name.qcow2" $size
    { printf "$ops_none"; cat "$work/$name.qcow2"; } >"$out/qcow2/$name"
    # 64 KiB clusters make `check` walk 32768 refcounts per block: one such seed only.
    [[ $name == c64k-* ]] && return
    qemu-io -f qcow2 -c "write -P 0xaa 0 64k" -c "write -P 0x55 1M 4k" "$work/$name.qcow2" >/dev/null
    { printf "$ops_some"; cat "$work/$name.qcow2"; } >"$out/qcow2/$name-data"
}
if have qemu-img && have qemu-io; then
    qcow2_seed c64k-1g 1G
    qcow2_seed c4k-64m 64M -o cluster_size=4096
    qcow2_seed c512-4m 4M -o cluster_size=512
    qcow2_seed v2-16m 16M -o compat=0.10,cluster_size=4096
    qcow2_seed rc1-16m 16M -o cluster_size=4096,refcount_bits=1
    qcow2_seed rc64-16m 16M -o cluster_size=4096,refcount_bits=64
    qcow2_seed lazy-16m 16M -o cluster_size=4096,lazy_refcounts=on
    qcow2_seed extl2-16m 16M -o cluster_size=16384,extended_l2=on
    qemu-img create -q -f qcow2 -o cluster_size=4096 "$work/base.qcow2" 16M
    qcow2_seed backing-16m "" -o cluster_size=4096 -b "$work/base.qcow2" -F qcow2
    # Compressed clusters, zlib and zstd.
    head -c 65536 /dev/zero | tr '\0' 'a' >"$work/data.raw"
    truncate -s 1M "$work/data.raw"
    for c in zlib zstd; do
        if qemu-img convert -q -c -O qcow2 -o cluster_size=4096,compression_type=$c \
            "$work/data.raw" "$work/comp-$c.qcow2" 2>/dev/null; then
            { printf "$ops_some"; cat "$work/comp-$c.qcow2"; } >"$out/qcow2/compressed-$c"
        fi
    done
else
    echo "seeds.sh: no qemu-img/qemu-io: qcow2 starts from an empty corpus" >&2
fi

# --- luks1: [flags: bit 0 detached][header image] (fuzz_targets/luks1.rs) ---
# Detached headers are cut after slot 0's key material (all that unlocking reads).
cut_after_slot0() { # FILE: keeps the header and key slot 0's material
    python3 - "$1" <<'PY'
import struct, sys
path = sys.argv[1]
data = open(path, "rb").read()
key_bytes = struct.unpack(">I", data[108:112])[0]
offset, stripes = struct.unpack(">II", data[208 + 40:208 + 48])
end = offset * 512 + -(-key_bytes * stripes // 512) * 512
open(path, "wb").write(data[:max(end, 592)])
PY
}
if have cryptsetup && have python3; then
    printf fuzz >"$work/key"
    n=0
    for spec in aes-cbc-essiv:sha256:256 aes-xts-plain64:512 aes-cbc-plain:128 \
        serpent-xts-plain64:256 twofish-cbc-essiv:sha256:256 aes-ecb:128; do
        cipher="${spec%:*}"
        bits="${spec##*:}"
        for hash in sha256 sha1 sha512; do
            n=$((n + 1))
            [[ $hash != sha256 && $n -gt 8 ]] && continue
            truncate -s 4M "$work/payload"
            rm -f "$work/hdr"
            if cryptsetup luksFormat --type luks1 --batch-mode --pbkdf-force-iterations 1000 \
                --key-file "$work/key" --cipher "$cipher" --key-size "$bits" --hash "$hash" \
                --header "$work/hdr" "$work/payload" >/dev/null 2>&1; then
                cut_after_slot0 "$work/hdr"
                { printf '\x01'; cat "$work/hdr"; } >"$out/luks1/detached-${cipher//:/_}-$hash"
            fi
        done
    done
    # One attached volume: header, 8 slots of 128-bit key material, 8 KiB payload.
    truncate -s 4M "$work/attached"
    if cryptsetup luksFormat --type luks1 --batch-mode --pbkdf-force-iterations 1000 \
        --key-file "$work/key" --cipher aes-cbc-plain --key-size 128 --align-payload 8 \
        "$work/attached" >/dev/null 2>&1; then
        python3 - "$work/attached" <<'PY'
import struct, sys
path = sys.argv[1]
data = open(path, "rb").read()
payload = struct.unpack(">I", data[104:108])[0] * 512
open(path, "wb").write(data[:payload + 8192])
PY
        { printf '\x00'; cat "$work/attached"; } >"$out/luks1/attached-aes-cbc-plain"
    fi
else
    echo "seeds.sh: no cryptsetup: luks1 starts from an empty corpus" >&2
fi

# --- luks2: [flags: bit 0 detached][header image] (fuzz_targets/luks2.rs) ---
# Detached headers with small metadata and key slot areas (16 KiB + 256 KiB).
if have cryptsetup; then
    printf fuzz >"$work/key"
    for kdf in pbkdf2 argon2id argon2i; do
        for sector in 512 4096; do
            truncate -s 4M "$work/payload"
            rm -f "$work/hdr2"
            if [[ $kdf == pbkdf2 ]]; then
                cost=(--pbkdf-force-iterations 1000)
            else
                cost=(--pbkdf-memory 1024 --pbkdf-force-iterations 4)
            fi
            if cryptsetup luksFormat --type luks2 --batch-mode --pbkdf "$kdf" "${cost[@]}" \
                --luks2-metadata-size 16k --luks2-keyslots-size 256k --sector-size "$sector" \
                --key-file "$work/key" --header "$work/hdr2" "$work/payload" >/dev/null 2>&1; then
                { printf '\x01'; cat "$work/hdr2"; } >"$out/luks2/detached-$kdf-$sector"
            fi
        done
    done
else
    echo "seeds.sh: no cryptsetup: luks2 starts from an empty corpus" >&2
fi

# --- QMP: messages from vmm/src/qmp/tests.rs ---
python3 - "$out" <<'PY'
import os, sys
out = sys.argv[1]
messages = [
    b'{"execute": "qmp_capabilities"}',
    b'{"execute":"qmp_capabilities","arguments":{"enable":[]},"id":[1,{"x":null}]}',
    b'{"execute":"query-status","id":"a"}',
    b'{"execute":"query-kvm","id":true}',
    b'{"execute":"query-version"}',
    b'{"execute":"query-commands"}',
    b'{"execute":"query-kvm","id":1}{"execute":"query-kvm","id":2}',
    b'{"execute":"device_del","arguments":{"id":1}}',
    b'{"execute":"foo"}',
    b'{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","drive":"n0","id":"d0","num-queues":2,"queue-size":128,"logical_block_size":4096,"physical_block_size":4096,"serial":"abc","addr":"0x5"}}',
    b'{"execute":"device_del","arguments":{"id":"d0"},"id":"del"}',
    b'{"execute":"object-add","arguments":{"qom-type":"secret","id":"sec0","data":"abc123"}}',
    b'{"execute":"object-add","arguments":{"qom-type":"secret","id":"sec1","data":"YWJj","format":"base64"}}',
    b'{"execute":"object-del","arguments":{"id":"sec0"}}',
    b'{"execute":"blockdev-add","arguments":{"node-name":"disk0","driver":"luks","key-secret":"sec0","file":{"driver":"qcow2","file":{"driver":"file","filename":"disk.qcow2"}},"header":"hdr"}}',
    b'{"execute":"blockdev-del","arguments":{"node-name":"disk0"}}',
    b'{"execute":"query-named-block-nodes","arguments":{"flat":true}}',
    b'{"execute":"query-block"}{"execute":"query-pci"}',
    b'{"execute":"system_powerdown"}',
    b'{"execute":"quit","id":1}',
    b"{'execute': 'query-status', 'id': '\\u00e9\\ud83d\\ude00'}",
    b'{"execute":"query-status","id":[1.5e300,-0.0,18446744073709551616,-9223372036854775808]}',
    b'{"execute":"query-status", "id": 3',
    b'\xff{"execute":"query-status"}\n[1,2,]\n{"a":}\n"\\x"',
]
for i, m in enumerate(messages):
    open(os.path.join(out, "qmp_parser", f"msg{i:02}"), "wb").write(m)
    open(os.path.join(out, "qmp_lexer", f"msg{i:02}"), "wb").write(bytes([3]) + m)
    open(os.path.join(out, "qmp_dispatch", f"msg{i:02}"), "wb").write(bytes([1]) + m)
# A whole session, negotiating itself.
open(os.path.join(out, "qmp_dispatch", "session"), "wb").write(bytes([0]) + b"\n".join(messages[:20]))
PY

# --- config: a JSON config (docs/disks.md) and command-line options ---
cat >"$out/config/disks-md" <<'JSON'
{
  "machine": { "cpus": 2, "memory": "512M", "io-workers": 4 },
  "boot": { "kernel": "vmlinuz", "initrd": "initramfs.cpio.gz", "cmdline": "console=ttyS0" },
  "objects":   [ { "qom-type": "secret", "id": "sec0", "data": "abc123" } ],
  "blockdevs": [
    { "node-name": "hdr-storage", "driver": "file", "filename": "disk.header" },
    { "node-name": "hdr", "driver": "raw", "file": "hdr-storage" },
    { "node-name": "payload", "driver": "qcow2",
      "file": { "driver": "file", "filename": "disk.qcow2" } },
    { "node-name": "disk0", "driver": "luks", "file": "payload", "header": "hdr",
      "key-secret": "sec0" }
  ],
  "devices": [ { "driver": "virtio-blk-pci", "drive": "disk0", "id": "virtio-disk0",
                 "serial": "disk0" } ],
  "qmp": "qmp.sock",
  "serial": "file:serial.log"
}
JSON
cat >"$out/config/options" <<'TXT'
--object=secret,id=sec0,data=abc123
--blockdev={"node-name":"r","driver":"file","filename":"data.raw"}
--blockdev=driver=qcow2,node-name=q,file.driver=file,file.filename=d.qcow2,cache.direct=on
--device=virtio-blk-pci,drive=r,id=vdb,num-queues=4,queue-size=256,addr=0x6
--memory=1G
--cpus=4
--serial=stdio
--qmp=tcp:127.0.0.1:4444
TXT
{ cat "$out/config/disks-md"; cat "$out/config/options"; } >"$out/config/both"

# --- virtio_blk_chain: [flags][u16 avail idx][guest memory from 0] ---
python3 - "$out/virtio_blk_chain" <<'PY'
import os, struct, sys
out = sys.argv[1]
NEXT, WRITE, INDIRECT = 1, 2, 4

def image(chains, extra=()):
    """chains: lists of (addr, len, flags); returns guest memory bytes."""
    mem = bytearray(0x4000)
    def desc(table, i, addr, ln, fl, nxt):
        struct.pack_into("<QIHH", mem, table + 16 * i, addr, ln, fl, nxt)
    i = 0
    heads = []
    for chain in chains:
        heads.append(i)
        for j, (addr, ln, fl) in enumerate(chain):
            last = j == len(chain) - 1
            desc(0, i, addr, ln, fl | (0 if last else NEXT), 0 if last else i + 1)
            i += 1
    for k, h in enumerate(heads):
        struct.pack_into("<H", mem, 0x1004 + 2 * k, h)
    struct.pack_into("<HH", mem, 0x1000, 0, len(heads))
    for at, data in extra:
        mem[at:at + len(data)] = data
    return mem, desc

def header(at, ty, sector):
    return (at, struct.pack("<IIQ", ty, 0, sector))

extra = [header(0x3000, 1, 0), header(0x3020, 0, 1), header(0x3040, 4, 0),
         header(0x3060, 8, 0), header(0x3080, 11, 0), header(0x30a0, 13, 2),
         (0x30c0, struct.pack("<QII", 4, 8, 0)), (0x30e0, struct.pack("<QII", 2, 4, 1)),
         (0x3100, b"\x77" * 1024)]
chains = [
    [(0x3000, 16, 0), (0x3100, 512, 0), (0x3500, 1, WRITE)],             # OUT
    [(0x3020, 16, 0), (0x3600, 1024, WRITE), (0x3a00, 1, WRITE)],        # IN
    [(0x3040, 16, 0), (0x3a01, 1, WRITE)],                               # FLUSH
    [(0x3060, 16, 0), (0x3a10, 20, WRITE), (0x3a30, 1, WRITE)],          # GET_ID
    [(0x3080, 16, 0), (0x30c0, 16, 0), (0x3a31, 1, WRITE)],              # DISCARD
    [(0x30a0, 16, 0), (0x30e0, 16, 0), (0x3a32, 1, WRITE)],              # WRITE_ZEROES
    [(0x3800, 48, INDIRECT)],                                            # indirect IN
]
mem, desc = image(chains, extra)
# The indirect table: header, 512 bytes into high memory (after the hole), status.
struct.pack_into("<QIHH", mem, 0x3800, 0x3020, 16, NEXT, 1)
struct.pack_into("<QIHH", mem, 0x3810, 0x20000, 512, NEXT | WRITE, 2)
struct.pack_into("<QIHH", mem, 0x3820, 0x3a40, 1, WRITE, 0)
for flags, name in [(0x07, "all-256"), (0x0f, "all-event-idx"), (0x13, "all-ro-8"), (0x27, "all-nodiscard")]:
    open(os.path.join(out, name), "wb").write(bytes([flags, 0, 0]) + bytes(mem))
# A loop, a chain across the hole, one with a huge length, one out of memory.
loop, _ = image([[(0x3000, 16, 0), (0x3500, 1, WRITE)]], extra)
struct.pack_into("<QIHH", loop, 0, 0x3000, 16, NEXT, 0)
open(os.path.join(out, "loop"), "wb").write(bytes([0x07, 0, 0]) + bytes(loop))
hole, _ = image([[(0x3000, 16, 0), (0xf000, 0x2000, 0), (0x3500, 1, WRITE)]], extra)
open(os.path.join(out, "across-hole"), "wb").write(bytes([0x07, 0, 0]) + bytes(hole))
huge, _ = image([[(0x3020, 16, 0), (0x3100, 0xffff_ff00, WRITE), (0x3500, 1, WRITE)]], extra)
open(os.path.join(out, "huge"), "wb").write(bytes([0x07, 0, 0]) + bytes(huge))
far, _ = image([[(0x3000, 16, 0), (1 << 40, 512, 0), (0x3500, 1, WRITE)]], extra)
open(os.path.join(out, "far"), "wb").write(bytes([0x07, 0x40, 0x00]) + bytes(far))
PY

for t in "$out"/*/; do
    echo "seeds.sh: $(basename "$t"): $(find "$t" -type f | wc -l) seeds"
done
