#!/usr/bin/env bash
# Builds cryptvm, then creates a detached-header LUKS disk in a scratch folder
# and shows `img info` of it: the README's first command.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p vmm
cryptvm="$root/target/release/cryptvm"
work=${1:-$(mktemp -d)}
mkdir -p "$work"
cd "$work"
(umask 077; printf %s abc123 > pass.txt)
"$cryptvm" img create --object secret,id=sec0,file=pass.txt -f luks \
    -o cipher-alg=aes-256,cipher-mode=xts -o key-secret=sec0 \
    -o detached-header=true test-header.img
"$cryptvm" img create -f qcow2 test-payload.qcow2 1G
"$cryptvm" img info 'json:{"driver":"luks","file":{"driver":"qcow2","file":{"filename":"test-payload.qcow2"}},"header":{"filename":"test-header.img"}}'
echo "files are in $work"
