# rollguard-agent %preun ($1: 0 = erase, 1 = upgrade). Erasing stops the
# agent (and every bundle it runs) and disables it; upgrades leave it running.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop rollguard-agent.service >/dev/null 2>&1 || :
    fi
    systemctl --no-reload disable rollguard-agent.service >/dev/null 2>&1 || :
fi
