# rollguard-agent %postun ($1: 0 = erase, 1 = upgrade).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        # Upgrade: restart only if it was running.
        systemctl try-restart rollguard-agent.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 0 ]; then
    # RPM has no purge: state is kept as long as it holds any file (the
    # hash-chained run log is evidence). Remove /var/lib/rollguard by hand to
    # purge.
    if [ -d /var/lib/rollguard ] && [ -z "$(find /var/lib/rollguard -type f -print -quit 2>/dev/null)" ]; then
        rm -rf /var/lib/rollguard
    fi
    # cargo-generate-rpm cannot list directories, so RPM does not own (nor
    # remove) the ones this package's files live in: remove them when empty.
    find /usr/share/doc/rollguard-agent -depth -type d -empty -delete 2>/dev/null || :
    rmdir /usr/libexec/rollguard 2>/dev/null || :
    rmdir /etc/rollguard 2>/dev/null || :
fi
