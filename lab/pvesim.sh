#!/usr/bin/env bash
# The lab's Proxmox VE: the API simulator (lab/pvesim) with the docker backend,
# so a started VM is a node container on the lab network.
#   lab/pvesim.sh start | stop | url
# HTTPS on 127.0.0.1:$MLFLEET_LAB_PVE_PORT (8006); its CA, admin token, state
# file (VMs survive a restart) and log are in $LAB_STATE/pvesim/.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

dir="$LAB_STATE/pvesim"
pidfile="$dir/pvesim.pid"
python=${MLFLEET_PYTHON:-$REPO_ROOT/.venv/bin/python}

running() { daemon_running "$pidfile" lab.pvesim; }

# Any HTTP answer will do (401 without credentials): the server is up.
answers() { curl -sS -o /dev/null --cacert "$dir/ca.pem" "https://127.0.0.1:$LAB_PVE_PORT/api2/json/version"; }

start() {
    require_root "the lab's Proxmox simulator (its docker backend runs node containers)"
    init_state
    if running; then
        log "Proxmox simulator answers at https://127.0.0.1:$LAB_PVE_PORT"
        return
    fi
    [ -x "$python" ] || die "no Python at $python: run scripts/bootstrap first (or set MLFLEET_PYTHON)"
    mkdir -p "$dir"
    (cd "$REPO_ROOT" && "$python" -m lab.pvesim serve --backend docker --state "$dir/state.json" \
        --host 127.0.0.1 --port "$LAB_PVE_PORT" --daemon --pidfile "$pidfile" --log "$dir/pvesim.log")
    wait_until 30 "the Proxmox simulator on 127.0.0.1:$LAB_PVE_PORT (log: $dir/pvesim.log)" answers
    log "Proxmox simulator answers at https://127.0.0.1:$LAB_PVE_PORT"
}

stop() { stop_daemon "$pidfile" lab.pvesim; }

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    url) echo "https://127.0.0.1:$LAB_PVE_PORT" ;;
    *) die "usage: $0 start|stop|url" ;;
esac
