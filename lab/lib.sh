# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
# Shared helpers for the lab scripts. Sourced, never executed.
# The lab is a development and test stand-in for a Proxmox site; nothing in the
# collection itself reads or sources anything under lab/.

LAB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAB_ROOT/.." && pwd)

# Every object the lab creates carries this label (or lives under LAB_STATE),
# so lab down removes exactly what lab up made and nothing else.
LAB_NAME=${MLFLEET_LAB_NAME:-mlfleet-lab}
LAB_LABEL="io.mlfleet.lab=${LAB_NAME}"
LAB_STATE=${MLFLEET_LAB_STATE:-$REPO_ROOT/.lab}
LAB_CACHE=${MLFLEET_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mlfleet-lab}
LAB_NETWORK=${MLFLEET_LAB_NETWORK:-$LAB_NAME}
# Outside 10.0.0.0/8, where Swarm allocates overlay subnets by default.
LAB_SUBNET=${MLFLEET_LAB_SUBNET:-192.168.213.0/24}
LAB_GATEWAY=${MLFLEET_LAB_GATEWAY:-192.168.213.1}
LAB_REGISTRY_PORT=${MLFLEET_LAB_REGISTRY_PORT:-5000}
LAB_REGISTRY="${LAB_GATEWAY}:${LAB_REGISTRY_PORT}"
LAB_SUITE=${MLFLEET_LAB_SUITE:-bookworm}
LAB_PVE_PORT=${MLFLEET_LAB_PVE_PORT:-8006}

log() { printf '[lab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[lab] error: %s\n' "$*" >&2; exit 1; }

require_root() {
    [ "$(id -u)" = 0 ] || die "$1 must run as root (it manages dockerd, networks and host directories)"
}

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s until it
# succeeds or the deadline passes.
wait_until() {
    local timeout=$1 what=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "timed out after ${timeout}s waiting for ${what}"
        fi
        sleep 0.5
    done
}

# The Debian mirror this machine's apt already uses for SUITE, so image builds
# go wherever apt goes and no host name is written into the project.
APT_ETC=${MLFLEET_APT_ETC:-/etc/apt}

apt_mirror() {
    local suite=${1:-$LAB_SUITE} uri
    uri=$(
        {
            for f in "$APT_ETC"/sources.list.d/*.sources; do
                [ -f "$f" ] || continue
                awk -v suite="$suite" '
                    BEGIN { RS = ""; FS = "\n" }
                    {
                        uris = ""; suites = ""; types = ""; enabled = 1
                        for (i = 1; i <= NF; i++) {
                            if ($i ~ /^URIs:/)   { uris = $i;   sub(/^URIs:[ \t]*/, "", uris) }
                            if ($i ~ /^Suites:/) { suites = " " $i " "; sub(/^ Suites:/, " ", suites) }
                            if ($i ~ /^Types:/)  { types = $i }
                            if ($i ~ /^Enabled:[ \t]*no/) { enabled = 0 }
                        }
                        if (enabled && types ~ /(^|[ \t])deb([ \t]|$)/ && suites ~ ("[ \t]" suite "[ \t]")) {
                            split(uris, u, /[ \t]+/); print u[1]
                        }
                    }' "$f"
            done
            cat "$APT_ETC"/sources.list "$APT_ETC"/sources.list.d/*.list 2>/dev/null |
                sed -E 's/\[[^]]*\]//' |
                awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2 }'
        } | head -n 1
    )
    [ -n "$uri" ] || [ -n "${MLFLEET_LAB_MIRROR:-}" ] || die "no apt source for suite '$suite' found in $APT_ETC; add one or set MLFLEET_LAB_MIRROR"
    printf '%s\n' "${MLFLEET_LAB_MIRROR:-$uri}"
}

docker_answers() { docker info >/dev/null 2>&1; }

LAB_REGISTRY_CERTS_DIR="/etc/docker/certs.d/${LAB_REGISTRY}"
LAB_MANIFEST="$LAB_STATE/created-host-paths"
LAB_STATE_MARKER=.mlfleet-lab-state

# Create the state directory, marked so lab down only ever deletes its own.
init_state() {
    if [ -e "$LAB_STATE" ] && [ ! -f "$LAB_STATE/$LAB_STATE_MARKER" ] && [ -n "$(ls -A "$LAB_STATE")" ]; then
        die "$LAB_STATE exists, is not empty and was not made by lab up; choose another MLFLEET_LAB_STATE"
    fi
    mkdir -p "$LAB_STATE"
    echo "$LAB_NAME" > "$LAB_STATE/$LAB_STATE_MARKER"
    lab_instance >/dev/null
}

# lab_instance: a random id made with the state directory. Containers carry it,
# so one left by an earlier lab of the same name (its state directory removed,
# or a run killed before lab down, on a host that keeps Docker's data) is told
# apart from this lab's own.
lab_instance() {
    local file="$LAB_STATE/instance-id"
    if [ ! -s "$file" ]; then
        mkdir -p "$LAB_STATE"
        od -An -tx1 -N16 /dev/urandom | tr -d ' \n' > "$file.tmp" && mv "$file.tmp" "$file"
    fi
    cat "$file"
}

# Record a host path that the lab created outside LAB_STATE, for lab down.
record_host_path() { echo "$1" >> "$LAB_MANIFEST"; }

# mkdir_recorded DIR: mkdir -p, recording the topmost directory it had to create.
mkdir_recorded() {
    local dir=$1 top=""
    while [ ! -e "$dir" ]; do
        top=$dir
        dir=$(dirname "$dir")
    done
    if [ -n "$top" ]; then
        mkdir -p "$1"
        record_host_path "$top"
    fi
}

# lab_start_node NAME HOSTNAME CPUS MEMORY AUTHORIZED_KEYS [extra docker run args...]
# Starts one lab "VM": a container from the node image running its own sshd and
# dockerd, its Docker data in LAB_STATE/nodes/NAME. Empty CPUS or MEMORY means
# no limit. The flags are what a dockerd-in-container needs on these machines
# (--privileged fails here for lack of CAP_SYS_RESOURCE); the host cgroup tree
# and host cgroup namespace let the node put its own containers below itself.
lab_start_node() {
    local name=$1 hostname=$2 cpus=$3 memory=$4 keys=$5
    shift 5
    local data="$LAB_STATE/nodes/$name/docker"
    mkdir -p "$data"
    local args=(
        -d --name "$name" --hostname "$hostname" --label "$LAB_LABEL" --label io.mlfleet.lab.role=node
        --label "io.mlfleet.lab.instance=$(lab_instance)" --label "io.mlfleet.lab.made-for=$(node_identity "$keys")"
        --cap-add ALL --cap-drop SYS_RESOURCE
        --security-opt seccomp=unconfined --security-opt apparmor=unconfined --security-opt systempaths=unconfined
        --cgroupns host -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /tmp
        -v "$data:/var/lib/docker"
        --mount "type=bind,source=$LAB_STATE/registry/tls/ca.crt,target=/etc/docker/certs.d/${LAB_REGISTRY}/ca.crt,readonly"
        --network "$LAB_NETWORK"
        -e "NODE_SSH_AUTHORIZED_KEYS=$keys"
    )
    [ -n "$cpus" ] && args+=(--cpus "$cpus")
    # No swap beyond the memory budget, as a VM has none beyond its RAM.
    [ -n "$memory" ] && args+=(--memory "$memory" --memory-swap "$memory")
    docker run "${args[@]}" "$@" mlfleet-lab/node:latest >/dev/null
}

# node_identity AUTHORIZED_KEYS: what a plain node container is made for, this
# lab instance and the keys it lets in; lab up recreates a node whose label
# differs rather than restart it with a stale key.
node_identity() {
    printf '%s\n%s' "$(lab_instance)" "$1" | sha256sum | cut -c1-16
}

# lab_remove_nodes CONTAINER...: stop each node gracefully (its dockerd stops
# its own containers first), remove it, the cgroups its dockerd nested under it
# (the host runtime removes only the node's own, which fails while a child
# exists) and its Docker data.
lab_remove_nodes() {
    [ "$#" -gt 0 ] || return 0
    local ids names id name cgroup
    mapfile -t ids < <(docker inspect -f '{{.Id}}' "$@")
    mapfile -t names < <(docker inspect -f '{{.Name}}' "$@")
    docker stop -t 20 "$@" >/dev/null || true
    docker rm -f -v "$@" >/dev/null
    for id in "${ids[@]}"; do
        for cgroup in /sys/fs/cgroup/*/docker/"$id" /sys/fs/cgroup/docker/"$id" /sys/fs/cgroup/system.slice/docker-"$id".scope; do
            if [ -d "$cgroup" ]; then
                find "$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
            fi
        done
    done
    for name in "${names[@]}"; do
        rm -rf -- "${LAB_STATE:?}/nodes/${name#/}"
    done
}

# A lab VM's disk is its node's Docker data, LAB_STATE/nodes/NAME/docker; a
# new node starts from the node image with an empty one. A template may have a
# disk that holds more, as a golden template built with Packer holds the images
# its VMs will run: LAB_STATE/disks/VOLUME/docker, VOLUME as in the template's
# config (base-9000-disk-0). A full clone of the template gets a copy of it, as
# a Proxmox full clone copies its source's disks; a linked clone shares what it
# only reads, as a linked clone shares its template's base volume.
template_disk() { echo "$LAB_STATE/disks/$1/docker"; }

# lab_clone_disk VOLUME NAME [full|linked]: node NAME's disk becomes a clone of
# template disk VOLUME if the lab has built one, else empty. full (the default)
# copies every file. linked hard-links the image layers' contents
# (overlay2/<layer>/diff), which the node's dockerd only ever reads (they are
# overlayfs lower directories; a write goes to a container's own layer), and
# copies the rest (its databases are written in place), so that nothing the
# clone does changes the template, and the clone takes a second, not a copy of
# every layer.
lab_clone_disk() {
    local source target="$LAB_STATE/nodes/$2/docker" mode=${3:-full} layer
    source=$(template_disk "$1")
    rm -rf -- "$(dirname "$target")"
    [ -d "$source" ] || return 0
    mkdir -p "$target"
    case $mode in
        full) cp -a --reflink=auto -- "$source/." "$target" ;;
        linked)
            tar -C "$source" --exclude='./overlay2/*/diff' -cf - . | tar -C "$target" -xpf -
            for layer in "$source"/overlay2/*/diff; do
                [ -d "$layer" ] || continue
                layer=${layer#"$source/"}
                cp -a --link -- "$source/$layer" "$target/$layer"
            done
            ;;
        *) die "lab_clone_disk: clone mode '$mode' is neither full nor linked" ;;
    esac
}

# lab_remove_node_disk NAME: the disk of a VM that never started (no container).
lab_remove_node_disk() { rm -rf -- "${LAB_STATE:?}/nodes/$1"; }

# lab_build_template_disk VOLUME IMAGE...: build template disk VOLUME holding
# the lab registry's IMAGEs (lab/torchserve: mlfleet-lab/torchserve:latest as
# pushed by lab up). A node from the node image pulls them and stops; its data,
# less its engine id (each clone's dockerd makes its own), becomes the disk. An
# existing disk is kept while it holds the same images (by image id).
lab_build_template_disk() {
    local volume=$1 image
    shift
    local disk wanted="" name="$LAB_NAME-template-build"
    disk=$(template_disk "$volume")
    for image in "$@"; do
        wanted+="$image $(docker image inspect -f '{{.Id}}' "mlfleet-lab/${image#lab/}:latest")"$'\n'
    done
    if [ -d "$disk" ] && [ "$(cat "$disk.images" 2>/dev/null)"$'\n' = "$wanted" ]; then
        return 0
    fi
    log "building template disk $volume with $*"
    [ -z "$(docker ps -aq --filter "name=^${name}\$")" ] || lab_remove_nodes "$name"
    lab_start_node "$name" "$name" "" "" ""
    wait_until 90 "template build node $name (see: docker logs $name)" node_ready "$name"
    for image in "$@"; do
        docker exec "$name" docker pull -q "$LAB_REGISTRY/$image:latest" >/dev/null
    done
    docker stop -t 20 "$name" >/dev/null
    rm -rf -- "$(dirname "$disk")"
    mkdir -p "$(dirname "$disk")"
    mv "$LAB_STATE/nodes/$name/docker" "$disk"
    rm -f -- "$disk/engine-id"
    lab_remove_nodes "$name"
    printf '%s' "$wanted" > "$disk.images"
}

# daemon_running PIDFILE PATTERN: the process in PIDFILE lives and its command
# line holds PATTERN (a recycled PID is not mistaken for the daemon).
daemon_running() {
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && grep -qa -- "$2" "/proc/$(cat "$1")/cmdline"
}

# stop_daemon PIDFILE PATTERN: SIGTERM, up to 15 s to exit, then SIGKILL.
stop_daemon() {
    if daemon_running "$1" "$2"; then
        local pid deadline=$((SECONDS + 15))
        pid=$(cat "$1")
        kill -TERM "$pid"
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
    fi
    rm -f "$1"
}

# The settings other programs (the Proxmox simulator) need, one a line.
lab_settings() { printf '%s\n' "$LAB_NAME" "$LAB_NETWORK" "$LAB_SUBNET"; }

# subnet_host N: address N of the lab's /24 subnet.
subnet_host() {
    local network=${LAB_SUBNET%/*}
    echo "${network%.*}.$1"
}

node_ip() {
    docker inspect -f "{{ (index .NetworkSettings.Networks \"$LAB_NETWORK\").IPAddress }}" "$1"
}

# A node is up when its sshd accepts connections and its own dockerd answers.
node_ready() {
    docker exec "$1" bash -c 'docker info >/dev/null 2>&1 && (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null'
}
