#!/usr/bin/env bash
# Take the lab down: every container, network and volume labelled with this
# lab, the registry and its storage, the nodes' docker data, the generated
# inventory and the host paths lab up recorded; nothing else. Built images stay
# (they are the build cache), and dockerd keeps running (lab/dockerd.sh stop).
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
require_root "lab down"
started=$SECONDS
if [ -e "$LAB_STATE" ] && [ ! -f "$LAB_STATE/$LAB_STATE_MARKER" ]; then
    die "$LAB_STATE has no $LAB_STATE_MARKER: it was not made by lab up; refusing to delete it (check MLFLEET_LAB_STATE)"
fi

# The simulator first: nothing may start a VM while the lab goes.
"$LAB_ROOT/pvesim.sh" stop

if docker_answers; then
    mapfile -t containers < <(docker ps -aq --filter "label=$LAB_LABEL")
    if [ "${#containers[@]}" -gt 0 ]; then
        log "stopping and removing ${#containers[@]} container(s)"
        lab_remove_nodes "${containers[@]}"
    fi
    mapfile -t networks < <(docker network ls -q --filter "label=$LAB_LABEL")
    [ "${#networks[@]}" -eq 0 ] || docker network rm "${networks[@]}" >/dev/null
    mapfile -t volumes < <(docker volume ls -q --filter "label=$LAB_LABEL")
    [ "${#volumes[@]}" -eq 0 ] || docker volume rm "${volumes[@]}" >/dev/null
    # Tags that point at this lab's registry name an address that is gone.
    mapfile -t registry_tags < <(docker images --format '{{.Repository}}:{{.Tag}}' | grep "^${LAB_REGISTRY}/" | grep -v ':<none>$' || true)
    [ "${#registry_tags[@]}" -eq 0 ] || docker rmi "${registry_tags[@]}" >/dev/null
fi

"$LAB_ROOT/registry.sh" stop

if [ -f "$LAB_MANIFEST" ]; then
    while IFS= read -r path; do
        [ -n "$path" ] && rm -rf -- "$path"
    done < "$LAB_MANIFEST"
fi
rm -rf -- "$LAB_STATE"
log "lab '$LAB_NAME' is down in $((SECONDS - started))s"
