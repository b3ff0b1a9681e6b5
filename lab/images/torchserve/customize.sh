#!/usr/bin/env bash
# Install torch and TorchServe into the image's root file system (ROOTFS).
# The wheels are fetched on the build host through its own pip configuration
# (mirrors, local wheel folders), then installed offline inside the chroot.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${ROOTFS:?ROOTFS is not set: run through lab/images/build.sh}"

downloader=$(mktemp -d)
trap 'rm -rf "$downloader" "$ROOTFS/tmp/wheels"' EXIT
python3 -m venv "$downloader/venv"
mkdir -p "$ROOTFS/tmp/wheels"
"$downloader/venv/bin/pip" download --quiet --only-binary=:all: --dest "$ROOTFS/tmp/wheels" \
    -r "$here/requirements.txt" 2>&1 | grep -v 'is ignored' >&2 || true
ls "$ROOTFS"/tmp/wheels/torch-2.13.0*.whl >/dev/null 2>&1 || { echo "customize: no torch 2.13.0 wheel downloaded" >&2; exit 1; }
cp "$here/requirements.txt" "$ROOTFS/tmp/wheels/requirements.txt"

# The chroot gets a clean environment: the host's PIP_* settings name host paths.
in_rootfs() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$ROOTFS" "$@"; }
in_rootfs python3 -m venv /opt/torchserve
in_rootfs /opt/torchserve/bin/pip install --quiet --no-index --find-links /tmp/wheels -r /tmp/wheels/requirements.txt
in_rootfs /opt/torchserve/bin/python -c 'import torch, ts, yaml, PIL, numpy; print("torch", torch.__version__)' >&2

in_rootfs useradd --create-home --uid 1000 --shell /bin/bash model-server
install -d -o 1000 -g 1000 "$ROOTFS/home/model-server/model-store" "$ROOTFS/home/model-server/tmp" "$ROOTFS/home/model-server/logs"
# A default configuration, as the official image has; the torchserve role mounts its own.
cat > "$ROOTFS/home/model-server/config.properties" <<'PROPERTIES'
inference_address=http://0.0.0.0:8080
management_address=http://127.0.0.1:8081
metrics_address=http://0.0.0.0:8082
metrics_mode=prometheus
model_store=/home/model-server/model-store
PROPERTIES
chown 1000:1000 "$ROOTFS/home/model-server/config.properties"
rm -rf "$ROOTFS/root/.cache"
