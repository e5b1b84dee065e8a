#!/usr/bin/env python3
"""Create a LUKS1 header with QEMU's own LUKS code, through QMP `blockdev-create`.

qemu-img 10.0.2 cannot create detached headers (`-o detached-header=true` fails with
"Parameter 'detached-header' is unexpected"), so this drives
`qemu-system-x86_64 -machine none -qmp stdio` instead:

    qmp_capabilities
    object-add secret (the passphrase, from a file)
    blockdev-create  {driver: file, filename, size: 0}      -> job, wait, dismiss
    blockdev-add     {driver: file, node-name, filename}
    blockdev-create  {driver: luks, header|file: node, size, key-secret, OPTIONS} -> job
    quit

Usage:
    qemu-luks-create.py --passphrase-file PASS --header HDR [-o cipher-alg=aes-256 ...]
    qemu-luks-create.py --passphrase-file PASS --file IMG --size BYTES [-o ...]

Exit status 0 on success; otherwise 1 with QEMU's error on stderr.
Only the Python 3 standard library is used.
"""

import argparse
import json
import os
import subprocess
import sys

INT_OPTIONS = {"iter-time"}


class QmpError(Exception):
    pass


class Qmp:
    def __init__(self, qemu):
        self.proc = subprocess.Popen(
            [qemu, "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", "stdio"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.next_id = 0
        self.events = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            raise QmpError(f"QEMU closed its QMP stream: {err.strip()}")
        return json.loads(line)

    def cmd(self, name, **arguments):
        self.next_id += 1
        msg = {"execute": name, "id": self.next_id}
        if arguments:
            msg["arguments"] = arguments
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self.next_id:
                continue
            if "error" in reply:
                raise QmpError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def wait_job(self, job_id):
        """Waits for JOB_STATUS_CHANGE 'concluded', reports the job's error, dismisses it."""
        while True:
            for ev in self.events:
                if (ev.get("event") == "JOB_STATUS_CHANGE"
                        and ev["data"].get("id") == job_id
                        and ev["data"].get("status") == "concluded"):
                    self.events = []
                    jobs = self.cmd("query-jobs")
                    error = next((j.get("error") for j in jobs if j["id"] == job_id), None)
                    self.cmd("job-dismiss", id=job_id)
                    if error:
                        raise QmpError(f"job {job_id}: {error}")
                    return
            self.events.append(self._read())

    def create(self, job_id, options):
        self.cmd("blockdev-create", **{"job-id": job_id, "options": options})
        self.wait_job(job_id)

    def close(self):
        try:
            self.cmd("quit")
        except (QmpError, OSError):
            pass
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def parse_opts(opt_list):
    out = {}
    for group in opt_list:
        for item in group.split(","):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"option '{item}' is not key=value")
            out[key] = int(value) if key in INT_OPTIONS else value
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passphrase-file", required=True)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--header", help="detached header file to create")
    where.add_argument("--file", help="attached LUKS image to create")
    ap.add_argument("--size", type=int, default=0, help="payload bytes (attached only)")
    ap.add_argument("-o", dest="opts", action="append", default=[],
                    help="luks creation options, key=value[,key=value]")
    ap.add_argument("--qemu", default=os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64"))
    args = ap.parse_args()

    target = os.path.abspath(args.header or args.file)
    opts = parse_opts(args.opts)
    qmp = Qmp(args.qemu)
    try:
        qmp.cmd("object-add", **{"qom-type": "secret", "id": "sec0",
                                 "file": os.path.abspath(args.passphrase_file)})
        qmp.create("mkfile", {"driver": "file", "filename": target, "size": 0})
        qmp.cmd("blockdev-add", **{"driver": "file", "node-name": "target",
                                   "filename": target})
        luks = {"driver": "luks", "key-secret": "sec0"}
        luks.update(opts)
        if args.header:
            luks.update({"header": "target", "size": 0})
        else:
            luks.update({"file": "target", "size": args.size})
        qmp.create("mkluks", luks)
        qmp.cmd("blockdev-del", **{"node-name": "target"})
    except QmpError as e:
        print(f"qemu-luks-create: {e}", file=sys.stderr)
        qmp.close()
        return 1
    qmp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
