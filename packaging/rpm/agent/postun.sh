# rollguard-agent %postun ($1: 0 = erase, 1 = upgrade).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        # Upgrade: restart only if it was running.
        systemctl try-restart rollguard-agent.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 0 ]; then
    # RPM has no purge: state (the hash-chained run log is evidence) is kept
    # unless it is empty. Remove /var/lib/rollguard by hand to purge.
    rmdir /var/lib/rollguard 2>/dev/null || :
fi
