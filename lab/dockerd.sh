#!/usr/bin/env bash
# Make sure a Docker Engine answers on the control host.
#   lab/dockerd.sh ensure   install docker.io if dockerd is absent, start it if
#                           nothing answers, wait until it answers
#   lab/dockerd.sh stop     stop the dockerd this script started (by its PID), never another
#   lab/dockerd.sh status
# Machines without systemd (CI, containers) are the reason this exists; where a
# service manager already runs dockerd, `ensure` only waits for it.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

PIDFILE=${MLFLEET_DOCKERD_PIDFILE:-/run/mlfleet-lab-dockerd.pid}
LOGFILE=${MLFLEET_DOCKERD_LOG:-/var/log/mlfleet-lab-dockerd.log}

ensure() {
    if docker_answers; then
        log "dockerd answers"
        return
    fi
    require_root "starting dockerd"
    if ! command -v dockerd >/dev/null; then
        log "installing docker.io (dockerd not found)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null ||
            { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null; } ||
            die "apt-get could not install docker.io; install it and re-run"
    fi
    if [ -S /var/run/docker.sock ] && ! pgrep -x dockerd >/dev/null; then
        rm -f /var/run/docker.sock  # stale socket from a dockerd that died
    fi
    if ! pgrep -x dockerd >/dev/null; then
        log "starting dockerd (log: $LOGFILE)"
        setsid dockerd --pidfile "$PIDFILE" >>"$LOGFILE" 2>&1 </dev/null &
    fi
    wait_until 60 "dockerd to answer (see $LOGFILE)" docker info
    log "dockerd answers"
}

stop() {
    if [ ! -s "$PIDFILE" ]; then
        log "no dockerd started by the lab (no $PIDFILE); leaving any other dockerd alone"
        return
    fi
    local pid
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping dockerd pid $pid"
        kill -TERM "$pid"
        local deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && die "dockerd pid $pid still running after 30s"
    fi
    rm -f "$PIDFILE"
}

case "${1:-ensure}" in
    ensure) ensure ;;
    stop) stop ;;
    status)
        if docker_answers; then echo running; else echo stopped; exit 3; fi
        ;;
    *) die "usage: $0 ensure|stop|status" ;;
esac
