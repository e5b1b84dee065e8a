# Scenario "boot": the guest is up; show what it sees, then power off (rc 0).
grep -m1 'model name' /proc/cpuinfo
cat /proc/cmdline
echo "memory: $(grep MemTotal /proc/meminfo)"
