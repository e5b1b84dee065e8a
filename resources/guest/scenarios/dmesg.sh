#!/bin/sh
# Prints the kernel log, each line prefixed with CRYPTVM-DMESG, to compare where boot time
# goes under two VMMs without the serial console's cost: boot with `quiet initcall_debug
# cryptvm.scenario=dmesg` (resources/bench/boot.sh CMDLINE=...). Initcalls that took no
# measurable time are left out, as are "calling" lines.
dmesg | grep -v -e ' after 0 usecs' -e '] calling  ' | sed 's/^/CRYPTVM-DMESG /'
