"""The lab's golden template carries the Docker Engine configuration the docker_engine role writes for the lab.

A site builds its template by running the role (docs/golden-template.md), so a clone's first configuration run changes
nothing and restarts no Docker Engine. The lab's node image plays that template: its daemon.json must be, byte for
byte, what the role renders with the lab's settings (the role's defaults; the lab inventory sets no docker_engine_*
variable that reaches daemon.json), or every scale-out would rewrite it and restart dockerd on each new VM.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
ROLE = REPO_ROOT / "roles" / "docker_engine"
TEMPLATE_DAEMON_JSON = REPO_ROOT / "lab" / "images" / "node" / "rootfs" / "etc" / "docker" / "daemon.json"
LAB_INVENTORY = REPO_ROOT / "inventories" / "lab" / "group_vars" / "all.yml"
# The variables the role's daemon.json template reads.
DAEMON_JSON_SETTINGS = {
    "docker_engine_log_driver",
    "docker_engine_log_max_size",
    "docker_engine_log_max_file",
    "docker_engine_registry_mirrors",
    "docker_engine_insecure_registries",
    "docker_engine_default_address_pools",
    "docker_engine_extra_options",
    "docker_engine_nvidia_runtime",
    "docker_engine_nvidia_runtime_path",
}
# Read by the template through _docker_engine_node_generic_resources (vars/main.yml).
INDIRECT_SETTINGS = {"docker_engine_generic_resources", "docker_engine_gpu_resource_kind"}


def render_daemon_json(workdir: Path, settings: dict) -> bytes:
    playbook = workdir / "render.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Render the docker_engine role's daemon.json",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
                    "tasks": [
                        {
                            "name": "Render",
                            "ansible.builtin.template": {
                                "src": str(ROLE / "templates" / "daemon.json.j2"),
                                "dest": str(workdir / "daemon.json"),
                                "mode": "0644",
                            },
                        }
                    ],
                }
            ]
        )
    )
    ansible_playbook = Path(sys.executable).with_name("ansible-playbook")
    # As extra vars: play vars rank below the role's files read as vars_files.
    command = [str(ansible_playbook), "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}"]
    command += ["-e", json.dumps(settings), str(playbook)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return (workdir / "daemon.json").read_bytes()


def test_the_lab_inventory_sets_nothing_that_reaches_daemon_json():
    lab_settings = yaml.safe_load(LAB_INVENTORY.read_text())
    assert (DAEMON_JSON_SETTINGS | INDIRECT_SETTINGS).isdisjoint(lab_settings), (
        "the lab sets daemon.json settings: render them into the node image's daemon.json"
    )


def test_the_template_read_by_the_role_uses_only_the_settings_named_here():
    template = (ROLE / "templates" / "daemon.json.j2").read_text()
    read = set(re.findall(r"\bdocker_engine_\w+", template))
    assert read == DAEMON_JSON_SETTINGS


def test_the_golden_template_holds_what_the_role_writes(tmp_path):
    assert render_daemon_json(tmp_path, {}) == TEMPLATE_DAEMON_JSON.read_bytes()


def test_other_settings_render_another_file(tmp_path):
    """The comparison can fail: a setting a site changes makes the role write (and restart dockerd on) every clone."""
    assert render_daemon_json(tmp_path, {"docker_engine_log_max_size": "20m"}) != TEMPLATE_DAEMON_JSON.read_bytes()


NVIDIA_RUNTIME = {"nvidia": {"path": "nvidia-container-runtime", "runtimeArgs": []}}


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        # The lab's GPU nodes: fake GPUs given by inventory, no runtime.
        (
            {"docker_engine_generic_resources": ["NVIDIA-GPU=lab-gpu-0", "NVIDIA-GPU=lab-gpu-1"]},
            {"node-generic-resources": ["NVIDIA-GPU=lab-gpu-0", "NVIDIA-GPU=lab-gpu-1"]},
        ),
        # A real GPU node: the GPUs nvidia-smi listed in the preflight, the NVIDIA runtime as the default one.
        (
            {"docker_engine_nvidia_runtime": True, "_docker_engine_discovered_gpus": ["GPU-a1", "GPU-b2"]},
            {"node-generic-resources": ["NVIDIA-GPU=GPU-a1", "NVIDIA-GPU=GPU-b2"], "default-runtime": "nvidia", "runtimes": NVIDIA_RUNTIME},
        ),
        # Resources given win over the discovered ones; the kind is the site's.
        (
            {"docker_engine_nvidia_runtime": True, "_docker_engine_discovered_gpus": ["GPU-a1"], "docker_engine_generic_resources": ["gpu=0"]},
            {"node-generic-resources": ["gpu=0"], "default-runtime": "nvidia", "runtimes": NVIDIA_RUNTIME},
        ),
        (
            {"docker_engine_nvidia_runtime": True, "_docker_engine_discovered_gpus": ["GPU-a1"], "docker_engine_gpu_resource_kind": "GPU"},
            {"node-generic-resources": ["GPU=GPU-a1"]},
        ),
        # Without GPUs nothing of it is written.
        ({"_docker_engine_discovered_gpus": ["GPU-a1"]}, {"node-generic-resources": None, "default-runtime": None}),
    ],
)
def test_gpu_settings_render_the_resources_and_the_runtime(tmp_path, settings, expected):
    daemon = json.loads(render_daemon_json(tmp_path, settings))
    for key, value in expected.items():
        assert daemon.get(key) == value, daemon
