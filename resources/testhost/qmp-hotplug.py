#!/usr/bin/env python3
"""Hot-adds and removes a LUKS disk with a detached header over QMP, with the PyPI
`qemu.qmp` library (unmodified), against QEMU or cryptvm.

    qmp-hotplug.py --qmp 127.0.0.1:PORT --console FILE --dir DIR --secret-file PASS
                   [--rounds 2] [--timeout 240]

The guest runs the "hotplug" scenario (resources/guest/scenarios/hotplug.sh) and prints
`CRYPTVM-HP ready|seen|io-done|gone round=R` lines on its console, which reach FILE here
(the harness copies them there as they are written). For each round this script:

1. waits for `ready round=R` (the guest boots with no disk and polls for /dev/vda);
2. sends the seven commands of QEMU's "Add LUKS volume to a VM with a detached header"
   (docs/devel/luks-detached-header.rst), with one secret id throughout: object-add
   secret; blockdev-add file + raw (header); file + qcow2 (payload); luks with `header`;
   device_add virtio-blk-pci;
3. measures the time from device_add's reply to the guest's `seen round=R` line;
4. waits for `io-done round=R`, then device_del, waits for DEVICE_DELETED of the device,
   blockdev-del of the luks, qcow2, raw and both file nodes, object-del of the secret;
   waits for `gone round=R`.

After the last round and the guest's `CRYPTVM-HP end failed=0`, it sends `quit`.

DIR is the folder of disk.header and disk.qcow2 as the VMM sees it (inside the L1 test
host: /work/files). It prints every command and reply (`QMP -> ...`, `QMP <- ...`), the
events it waited for, and one line per round:

    HOTPLUG round=R latency_s=S

Exit status 0 when every step succeeded; otherwise 1 (it sends `quit` then too, so that
the run ends instead of waiting for the guest's time limits).
"""

import argparse
import asyncio
import json
import os
import re
import sys
import time

from qemu.qmp import EventListener, QMPClient

SECRET = "libvirt-4-format-secret"
DEVICE = "virtio-disk2"
# node-name, driver, options: the header's file and raw nodes, the payload's file and
# qcow2 nodes, and the luks node on top, in the order of the procedure.
NODES = [
    ("libvirt-1-storage", "file", {"filename": "{dir}/disk.header"}),
    ("libvirt-1-format", "raw", {"file": "libvirt-1-storage"}),
    ("libvirt-2-storage", "file", {"filename": "{dir}/disk.qcow2"}),
    ("libvirt-2-format", "qcow2", {"file": "libvirt-2-storage"}),
    ("libvirt-3-format", "luks",
     {"file": "libvirt-2-format", "header": "libvirt-1-format", "key-secret": SECRET}),
]
# blockdev-del order: users before what they use (luks, qcow2, raw, then the files).
DELETE_ORDER = ["libvirt-3-format", "libvirt-2-format", "libvirt-1-format",
                "libvirt-2-storage", "libvirt-1-storage"]


class Failure(Exception):
    pass


def log(*words):
    print(*words, flush=True)


HEARTBEAT = re.compile(r"CRYPTVM-L1-ALIVE\r?\n")


class Console:
    """The guest's console lines, read from a file as it grows."""

    def __init__(self, path):
        self.path = path
        self.text = ""
        self.pos = 0

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.pos:  # the test host was booted again: start over
                    self.pos, self.text = 0, ""
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        self.pos += len(data)
        self.text += data.decode("utf-8", "replace")
        # The test host's own heartbeat may land in the middle of a guest line.
        self.text = HEARTBEAT.sub("", self.text)

    async def wait_for(self, marker, timeout):
        """Waits (5 ms polls) until a whole line containing `marker` appears; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            # Whole lines only: the last one may still be being written.
            for line in self.text[:self.text.rfind("\n") + 1].splitlines():
                if marker in line:
                    return line.strip()
            if time.monotonic() > deadline:
                raise Failure(f"no '{marker}' on the guest console after {timeout} s")
            await asyncio.sleep(0.005)


async def connect(address, timeout):
    """Connects, retrying until the VMM (inside the booting test host) listens."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        qmp = QMPClient("cryptvm-hotplug")
        try:
            await qmp.connect(address)
        except Exception as e:  # noqa: BLE001 (the VMM is not up yet: any failure)
            await qmp.disconnect()
            if time.monotonic() > deadline:
                raise Failure(f"cannot connect to {address}: {e}") from e
            await asyncio.sleep(0.25)
            continue
        log(f"connected to {address[0]}:{address[1]} after {attempts} attempt(s); "
            f"greeting {qmp.greeting!r}")
        return qmp


async def execute(qmp, cmd, args=None):
    log("QMP ->", json.dumps({"execute": cmd, **({"arguments": args} if args else {})}))
    try:
        ret = await qmp.execute(cmd, args)
    except Exception as e:
        log("QMP <-", f"error: {e}")
        raise Failure(f"{cmd} failed: {e}") from e
    log("QMP <-", json.dumps({"return": ret}))
    return ret


async def add_disk(qmp, directory, passphrase):
    """The seven commands. Returns the monotonic time of device_add's reply."""
    await execute(qmp, "object-add",
                  {"qom-type": "secret", "id": SECRET, "data": passphrase})
    for name, driver, opts in NODES:
        args = {"node-name": name, "driver": driver}
        for k, v in opts.items():
            args[k] = v.replace("{dir}", directory) if isinstance(v, str) else v
        await execute(qmp, "blockdev-add", args)
    await execute(qmp, "device_add",
                  {"driver": "virtio-blk-pci", "drive": "libvirt-3-format", "id": DEVICE})
    return time.monotonic()


async def remove_disk(qmp, listener, timeout):
    await execute(qmp, "device_del", {"id": DEVICE})
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure(f"no DEVICE_DELETED for {DEVICE} after {timeout} s")
        try:
            event = await asyncio.wait_for(listener.get(), left)
        except asyncio.TimeoutError:
            continue
        log("QMP <- event", json.dumps({"event": event["event"], "data": event.get("data")}))
        # QEMU also reports its virtio backend child (no "device" key).
        if event.get("data", {}).get("device") == DEVICE:
            break
    for name in DELETE_ORDER:
        await execute(qmp, "blockdev-del", {"node-name": name})
    await execute(qmp, "object-del", {"id": SECRET})


async def run(opts):
    host, _, port = opts.qmp.rpartition(":")
    with open(opts.secret_file, encoding="utf-8") as f:
        passphrase = f.read()
    console = Console(opts.console)
    start = time.monotonic()
    left = lambda: max(1.0, opts.timeout - (time.monotonic() - start))  # noqa: E731
    qmp = await connect((host, int(port)), left())
    listener = EventListener(("DEVICE_DELETED",))
    qmp.register_listener(listener)
    try:
        ret = await execute(qmp, "query-version")
        log("VMM version:", json.dumps(ret))
        for r in range(1, opts.rounds + 1):
            await console.wait_for(f"CRYPTVM-HP ready round={r}", left())
            replied = await add_disk(qmp, opts.dir, passphrase)
            line = await console.wait_for(f"CRYPTVM-HP seen round={r}", left())
            latency = time.monotonic() - replied
            log(f"guest: {line}")
            log(f"HOTPLUG round={r} latency_s={latency:.3f}")
            line = await console.wait_for(f"CRYPTVM-HP io-done round={r}", left())
            log(f"guest: {line}")
            await remove_disk(qmp, listener, min(30.0, left()))
            line = await console.wait_for(f"CRYPTVM-HP gone round={r}", left())
            log(f"guest: {line}")
        line = await console.wait_for("CRYPTVM-HP end ", left())
        log(f"guest: {line}")
        if line.split("failed=")[-1].strip() != "0":
            raise Failure("the guest reported failures")
        log("HOTPLUG done")
        status = 0
    except Failure as e:
        log(f"HOTPLUG failed: {e}")
        status = 1
    # The guest waits for this (see hotplug.sh): the VM ends now, also after a failure.
    try:
        log("QMP ->", json.dumps({"execute": "quit"}))
        ret = await asyncio.wait_for(qmp.execute("quit"), 10)
        log("QMP <-", json.dumps({"return": ret}))
    except Exception as e:  # noqa: BLE001 (the VMM may close first, or be gone)
        log(f"quit: {e!r}")
    qmp.remove_listener(listener)
    try:
        await qmp.disconnect()
    except Exception:  # noqa: BLE001 (EOF once the VMM has quit)
        pass
    return status


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qmp", default=os.environ.get("CRYPTVM_QMP"),
                   help="HOST:PORT of the VMM's QMP server ($CRYPTVM_QMP)")
    p.add_argument("--console", default=os.environ.get("CRYPTVM_CONSOLE"),
                   help="file with the guest's console ($CRYPTVM_CONSOLE)")
    p.add_argument("--dir", default=os.environ.get("CRYPTVM_FILES"),
                   help="folder of disk.header and disk.qcow2 as the VMM sees it "
                        "($CRYPTVM_FILES)")
    p.add_argument("--secret-file", required=True, help="file holding the passphrase")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=240.0,
                   help="seconds for the whole sequence, test host boot included")
    opts = p.parse_args()
    for name in ("qmp", "console", "dir"):
        if not getattr(opts, name):
            p.error(f"--{name} is required")
    return asyncio.run(run(opts))


if __name__ == "__main__":
    sys.exit(main())
