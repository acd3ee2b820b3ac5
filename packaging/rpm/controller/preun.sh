# rollguard-controller %preun ($1: 0 = erase, 1 = upgrade).
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop rollguard-controller.service >/dev/null 2>&1 || :
    fi
    systemctl --no-reload disable rollguard-controller.service >/dev/null 2>&1 || :
fi
