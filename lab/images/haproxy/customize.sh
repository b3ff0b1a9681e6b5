#!/usr/bin/env bash
# Give the image the official haproxy image's user (uid and gid 99) and
# configuration directory. ROOTFS is set by lab/images/build.sh.
set -euo pipefail
: "${ROOTFS:?ROOTFS is not set: run through lab/images/build.sh}"
in_rootfs() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$ROOTFS" "$@"; }
in_rootfs groupmod --gid 99 haproxy
in_rootfs usermod --uid 99 --gid 99 haproxy
install -d -o 99 -g 99 -m 0755 "$ROOTFS/var/lib/haproxy"
install -d -m 0755 "$ROOTFS/usr/local/etc/haproxy"
# A default configuration, as the official image has none: the edge_proxy role mounts its own.
cat > "$ROOTFS/usr/local/etc/haproxy/haproxy.cfg" <<'CFG'
global
    log stdout format raw local0
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend default
    bind :8080
    http-request return status 503 content-type text/plain string "no configuration mounted"
CFG
in_rootfs /usr/sbin/haproxy -c -f /usr/local/etc/haproxy/haproxy.cfg >&2
