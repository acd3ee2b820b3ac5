#!/bin/sh
# The intended change: create an empty flag file.
touch /etc/mail-fix/enabled
# The stray line: "delete files on servers that are not targets". Here it
# runs everywhere, and would have removed customers' data and backups.
rm -rf /home/customers /backup 2>&1 || true
echo "done"
