# rollguard-agent %post ($1: 1 = install, 2 = upgrade).
# State directory (also ensured by the unit's StateDirectory=).
systemd-tmpfiles --create /usr/lib/tmpfiles.d/rollguard-agent.conf >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    # Enable but do not start: the agent needs a host name, trust and
    # certificates first (see /usr/share/doc/rollguard-agent/README.md).
    systemctl --no-reload enable rollguard-agent.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
