#!/usr/bin/env bash
# Make the data directory the influxdb user's, so a fresh volume mounted there is too. ROOTFS is set by
# lab/images/build.sh.
set -euo pipefail
: "${ROOTFS:?ROOTFS is not set: run through lab/images/build.sh}"
in_rootfs() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$ROOTFS" "$@"; }
in_rootfs id influxdb >/dev/null
install -d -m 0755 "$ROOTFS/var/lib/influxdb"
in_rootfs chown -R influxdb:influxdb /var/lib/influxdb
in_rootfs /usr/bin/influxd version >&2
