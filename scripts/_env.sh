# shellcheck shell=bash
# Sourced by the scripts in this directory: the repository's virtualenv, and
# this checkout visible to Ansible as mlfleet.serving.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MLFLEET_VENV:-$REPO_ROOT/.venv}
COLLECTIONS_ROOT="$REPO_ROOT/.ansible/collections"
if [ ! -x "$VENV/bin/python" ]; then
    echo "no virtualenv at $VENV: run scripts/bootstrap first" >&2
    exit 1
fi
# shellcheck source=/dev/null
. "$VENV/bin/activate"
export ANSIBLE_COLLECTIONS_PATH="$COLLECTIONS_ROOT"
export PIP_CONSTRAINT="$REPO_ROOT/constraints.txt"
# The molecule scenarios find the shared create/destroy playbooks and lab scripts here.
export MLFLEET_REPO="$REPO_ROOT"
cd "$REPO_ROOT" || exit 1
