#!/bin/sh
# As the official haproxy image's entry point: a first argument that is an
# option runs haproxy with it; "haproxy" runs in master-worker mode (-W) in the
# foreground (-db). Drops root for the haproxy user (uid 99), whose user the
# official image runs as.
set -e
if [ "${1#-}" != "$1" ]; then
    set -- haproxy "$@"
fi
if [ "$1" = haproxy ]; then
    shift
    set -- /usr/sbin/haproxy -W -db "$@"
fi
if [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid=99 --regid=99 --clear-groups -- "$@"
fi
exec "$@"
