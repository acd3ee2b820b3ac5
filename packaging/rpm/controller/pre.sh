# rollguard-controller %pre: the system user must exist before the files it
# group-owns are unpacked. Same definition as the shipped
# /usr/lib/sysusers.d/rollguard-controller.conf.
echo 'u rollguard-controller - "rollguard controller" /var/lib/rollguard-controller /usr/sbin/nologin' |
    systemd-sysusers --replace=/usr/lib/sysusers.d/rollguard-controller.conf - >/dev/null 2>&1 || :
getent passwd rollguard-controller >/dev/null || {
    echo "rollguard-controller: could not create the system user rollguard-controller" >&2
    exit 1
}
