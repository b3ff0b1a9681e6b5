#!/usr/bin/env bash
# Bring the lab up: dockerd on the control host, the lab network, the lab
# registry (TLS, bound to the lab gateway), an SSH key, and the Proxmox VE
# simulator whose VMs are node containers. site.yml provisions the VMs through
# it. Re-running lab up converges: what exists is kept.
#
#   MLFLEET_LAB_NODES=0        plain node containers to start besides, for tests
#                              and molecule scenarios (not needed by site.yml);
#                              node N gets the address <subnet>.(200+N)
#   MLFLEET_LAB_NODE_CPUS=1    CPU budget of each node (docker --cpus)
#   MLFLEET_LAB_NODE_MEMORY=2g memory budget of each node
#   MLFLEET_LAB_INVENTORY      where to write the plain nodes' inventory
#                              (default: inventories/lab/lab_nodes.yml)
#   MLFLEET_LAB_SERVING=0      1: also publish what site.yml serves with: the
#                              TorchServe, HAProxy and InfluxDB 1.x images in the
#                              lab registry (lab/torchserve, lab/haproxy,
#                              lab/influxdb) and the reference
#                              models in <state>/models (python -m models.build,
#                              with the python on PATH)
#   MLFLEET_LAB_TEMPLATE_IMAGES="" lab images (e.g. lab/torchserve) the golden
#                              template's disk holds, so its clones start with
#                              them pulled (lab_build_template_disk in lib.sh);
#                              empty: the template is the node image alone
# See lab/lib.sh for the names, subnet and paths (all MLFLEET_LAB_* overridable).
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
require_root "lab up"

nodes=${MLFLEET_LAB_NODES:-0}
[[ "$nodes" =~ ^[0-9]+$ && "$nodes" -le 50 ]] || die "MLFLEET_LAB_NODES=$nodes: give 0 to 50 plain nodes"
node_cpus=${MLFLEET_LAB_NODE_CPUS:-1}
node_memory=${MLFLEET_LAB_NODE_MEMORY:-2g}
serving=${MLFLEET_LAB_SERVING:-0}
read -ra template_images <<< "${MLFLEET_LAB_TEMPLATE_IMAGES:-}"
inventory=${MLFLEET_LAB_INVENTORY:-$REPO_ROOT/inventories/lab/lab_nodes.yml}
started=$SECONDS

init_state
"$LAB_ROOT/dockerd.sh" ensure
"$LAB_ROOT/images/build.sh" node >/dev/null

if ! docker network inspect "$LAB_NETWORK" >/dev/null 2>&1; then
    log "creating network $LAB_NETWORK ($LAB_SUBNET)"
    docker network create --driver bridge --subnet "$LAB_SUBNET" --gateway "$LAB_GATEWAY" \
        --label "$LAB_LABEL" "$LAB_NETWORK" >/dev/null
fi

"$LAB_ROOT/registry.sh" start

if [ ! -s "$LAB_STATE/ssh/id_ed25519" ]; then
    mkdir -p "$LAB_STATE/ssh" && chmod 700 "$LAB_STATE/ssh"
    ssh-keygen -q -t ed25519 -N '' -C "$LAB_NAME" -f "$LAB_STATE/ssh/id_ed25519"
fi

"$LAB_ROOT/pvesim.sh" start

if [ "$serving" = 1 ]; then
    for image in torchserve haproxy influxdb; do
        "$LAB_ROOT/images/build.sh" "$image" >/dev/null
        "$LAB_ROOT/registry.sh" push "mlfleet-lab/$image:latest" "lab/$image" >/dev/null
    done
    models="$LAB_STATE/models"
    if [ ! -s "$models/resnet18.mar" ] || [ ! -s "$models/densenet161.mar" ]; then
        log "building the reference models into $models"
        (cd "$REPO_ROOT" && python3 -m models.build --out "$models" >&2) ||
            die "could not build the reference models: run through scripts/site, whose virtualenv has torch"
    fi
fi

if [ "${#template_images[@]}" -gt 0 ]; then
    for image in "${template_images[@]}"; do
        [[ "$image" =~ ^lab/[a-z0-9-]+$ ]] || die "MLFLEET_LAB_TEMPLATE_IMAGES: '$image' is not a lab image; name them as lab/<image> (lab/torchserve)"
        "$LAB_ROOT/images/build.sh" "${image#lab/}" >/dev/null
        "$LAB_ROOT/registry.sh" push "mlfleet-lab/${image#lab/}:latest" "$image" >/dev/null
    done
    # The disk of the simulator's golden template, VM 9000 (lab/pvesim/config.py).
    lab_build_template_disk base-9000-disk-0 "${template_images[@]}"
fi

authorized_keys=$(cat "$LAB_STATE/ssh/id_ed25519.pub")
names=()
for i in $(seq 1 "$nodes"); do
    name="$LAB_NAME-node-$i"
    names+=("$name")
    if [ -n "$(docker ps -aq --filter "name=^${name}\$")" ] &&
        [ "$(docker inspect -f '{{index .Config.Labels "io.mlfleet.lab.made-for"}}' "$name")" != "$(node_identity "$authorized_keys")" ]; then
        log "node $name was made for another state directory or key; recreating it"
        lab_remove_nodes "$name"
    fi
    if [ -z "$(docker ps -aq --filter "name=^${name}\$")" ]; then
        log "starting node $name (cpus=$node_cpus memory=$node_memory)"
        lab_start_node "$name" "$name" "$node_cpus" "$node_memory" "$authorized_keys" \
            --ip "$(subnet_host $((200 + i)))"
    elif [ "$(docker inspect -f '{{.State.Running}}' "$name")" != true ]; then
        docker start "$name" >/dev/null
    fi
done
for name in "${names[@]}"; do
    wait_until 90 "node $name (sshd and dockerd; see: docker logs $name)" node_ready "$name"
done

if [ "$nodes" -eq 0 ]; then
    log "lab '$LAB_NAME' is up in $((SECONDS - started))s: Proxmox simulator $("$LAB_ROOT/pvesim.sh" url), registry $LAB_REGISTRY"
    exit 0
fi

mkdir -p "$(dirname "$inventory")"
{
    echo "# Generated by lab/up.sh for lab '$LAB_NAME'; removed by lab/down.sh."
    echo "all:"
    echo "  vars:"
    echo "    ansible_user: root"
    echo "    ansible_ssh_private_key_file: $LAB_STATE/ssh/id_ed25519"
    echo "    ansible_ssh_common_args: -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    echo "    lab_registry: $LAB_REGISTRY"
    echo "  children:"
    echo "    swarm:"
    echo "      children:"
    echo "        swarm_managers:"
    echo "          hosts:"
    for name in "${names[@]:0:1}"; do
        echo "            $name: {ansible_host: $(node_ip "$name")}"
    done
    echo "        swarm_workers:"
    echo "          hosts:"
    for name in "${names[@]:1}"; do
        echo "            $name: {ansible_host: $(node_ip "$name")}"
    done
} > "$inventory.tmp"
mv "$inventory.tmp" "$inventory"
grep -qxF "$inventory" "$LAB_MANIFEST" 2>/dev/null || record_host_path "$inventory"

log "lab '$LAB_NAME' is up in $((SECONDS - started))s: ${#names[@]} nodes, registry $LAB_REGISTRY, inventory $inventory"
