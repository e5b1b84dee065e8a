#!/usr/bin/env bash
# Makes (once) a Python virtual environment with the PyPI `qemu.qmp` library, for
# resources/testhost/qmp-hotplug.py, and prints its interpreter's path.
#
#   resources/testhost/qmp-venv.sh          # -> .../qmp-venv/bin/python3
#
# Where: ${CRYPTVM_QMP_VENV:-${CRYPTVM_CACHE:-$HOME/.cache/cryptvm}/qmp-venv}. Needs python3
# with the venv module (Debian: python3-venv) and PyPI. Nothing is done when the
# environment already imports qemu.qmp. tests/e2e/hotplug.rs looks for it there.
set -euo pipefail

VERSION=0.0.6
VENV="${CRYPTVM_QMP_VENV:-${CRYPTVM_CACHE:-${HOME:-/root}/.cache/cryptvm}/qmp-venv}"
log() { echo "testhost/qmp-venv.sh: $*" >&2; }

if ! "$VENV/bin/python3" -c 'import qemu.qmp' 2>/dev/null; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV" || {
        log "python3 -m venv failed (Debian: apt-get install python3-venv)"
        exit 1
    }
    "$VENV/bin/python3" -m pip install --quiet --disable-pip-version-check \
        "qemu.qmp==$VERSION" >&2
    "$VENV/bin/python3" -c 'import qemu.qmp' || { log "qemu.qmp does not import"; exit 1; }
    log "installed qemu.qmp $VERSION into $VENV"
fi
echo "$VENV/bin/python3"
