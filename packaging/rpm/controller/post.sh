# rollguard-controller %post ($1: 1 = install, 2 = upgrade).
systemd-tmpfiles --create /usr/lib/tmpfiles.d/rollguard-controller.conf >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    # Enable but do not start: there is no CA or certificate until
    # `rollguard-controller init`.
    systemctl --no-reload enable rollguard-controller.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
