# Scenario "shell": an interactive shell on the serial console; the guest powers off
# when it exits.
echo "cryptvm test guest: type 'exit' to power off"
setsid cttyhack sh
