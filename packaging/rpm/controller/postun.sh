# rollguard-controller %postun ($1: 0 = erase, 1 = upgrade).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart rollguard-controller.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 0 ]; then
    # RPM has no purge: the CA and database are kept unless empty, and so is
    # the system user that owns them. Remove /var/lib/rollguard-controller
    # (and the user) by hand to purge.
    rmdir /var/lib/rollguard-controller 2>/dev/null || :
    # cargo-generate-rpm cannot list directories, so RPM does not own (nor
    # remove) the ones this package's files live in: remove them when empty.
    rmdir /usr/share/doc/rollguard-controller 2>/dev/null || :
    rmdir /etc/rollguard 2>/dev/null || :
fi
