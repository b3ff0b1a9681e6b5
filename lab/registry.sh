#!/usr/bin/env bash
# The lab registry: Debian's docker-registry on the control host, TLS with a CA
# made for this lab, bound to the lab network's gateway only.
#   lab/registry.sh start | stop | push IMAGE [NAME]
# `push` tags a local image as <registry>/<NAME> and pushes it; the control
# host's dockerd trusts the lab CA through /etc/docker/certs.d/<registry>/.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

dir="$LAB_STATE/registry"
pidfile="$dir/registry.pid"

running() { daemon_running "$pidfile" docker-registry; }

answers() { curl -fsS --cacert "$dir/tls/ca.crt" "https://$LAB_REGISTRY/v2/" >/dev/null; }

make_tls() {
    mkdir -p "$dir/tls"
    (
        cd "$dir/tls"
        openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=$LAB_NAME registry CA" \
            -keyout ca.key -out ca.crt 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj "/CN=$LAB_GATEWAY" -keyout registry.key -out registry.csr 2>/dev/null
        printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth\n' "$LAB_GATEWAY" > ext.cnf
        openssl x509 -req -in registry.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
            -extfile ext.cnf -out registry.crt 2>/dev/null
        rm -f registry.csr ext.cnf ca.srl
        chmod 600 ca.key registry.key
    )
}

start() {
    require_root "the lab registry"
    init_state
    command -v docker-registry >/dev/null || {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-registry >/dev/null ||
            die "apt-get could not install docker-registry"
    }
    if running; then
        log "registry answers at $LAB_REGISTRY"
        return
    fi
    [ -s "$dir/tls/registry.crt" ] || make_tls
    mkdir -p "$dir/data"
    cat > "$dir/config.yml" <<CONF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: $LAB_REGISTRY
  tls:
    certificate: $dir/tls/registry.crt
    key: $dir/tls/registry.key
CONF
    mkdir_recorded "$LAB_REGISTRY_CERTS_DIR"
    cp "$dir/tls/ca.crt" "$LAB_REGISTRY_CERTS_DIR/ca.crt"
    setsid docker-registry serve "$dir/config.yml" >>"$dir/registry.log" 2>&1 </dev/null &
    echo $! > "$pidfile"
    wait_until 30 "the lab registry at $LAB_REGISTRY (log: $dir/registry.log)" answers
    log "registry answers at $LAB_REGISTRY"
}

stop() { stop_daemon "$pidfile" docker-registry; }

push() {
    local image=${1:?usage: $0 push IMAGE [NAME]} name tag=latest
    name=${2:-${image#*/}}
    # NAME without a tag keeps the image's own tag.
    case "${image##*/}" in *:*) tag=${image##*:} ;; esac
    case "${name##*/}" in *:*) ;; *) name="$name:$tag" ;; esac
    local target="$LAB_REGISTRY/$name"
    docker tag "$image" "$target"
    docker push -q "$target" >/dev/null
    echo "$target"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    push) shift; push "$@" ;;
    *) die "usage: $0 start|stop|push IMAGE [NAME]" ;;
esac
