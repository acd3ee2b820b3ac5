#!/bin/sh
# Appends a setting and removes stale temp files; fails on the first error.
set -eu
echo "maximal_queue_lifetime = 2d" >> /etc/postfix/main.cf
find /var/spool/postfix/tmp -type f -mtime +1 -delete
echo "postfix queue settings updated"
