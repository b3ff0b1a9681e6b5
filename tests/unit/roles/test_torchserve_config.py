"""The torchserve role's config.properties: a GPU service asks TorchServe for its GPUs, a CPU service renders as before
(a changed file would roll every replica of every existing service on upgrade)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
ROLE = REPO_ROOT / "roles" / "torchserve"
SETTINGS = {
    "torchserve_service": "resnet18",
    "_torchserve_stored_models": [{"file": "resnet18-0123456789abcdef.mar"}],
    "_torchserve_models_config": {"resnet18": {"1.0": {"batchSize": 4}}},
}


def render(workdir: Path, settings: dict) -> str:
    playbook = workdir / "render.yml"
    task = {
        "name": "Render",
        "ansible.builtin.template": {"src": str(ROLE / "templates" / "config.properties.j2"), "dest": str(workdir / "out"), "mode": "0644"},
    }
    playbook.write_text(
        yaml.safe_dump([{"name": "Render", "hosts": "localhost", "gather_facts": False, "vars_files": [str(ROLE / "defaults" / "main.yml")], "tasks": [task]}])
    )
    command = [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}"]
    result = subprocess.run([*command, "-e", json.dumps(settings), str(playbook)], capture_output=True, text=True, cwd=workdir, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return (workdir / "out").read_text()


@pytest.mark.parametrize(("gpus", "line"), [(0, None), ("0", None), (1, "number_of_gpu=1"), (2, "number_of_gpu=2")])
def test_only_a_gpu_service_sets_number_of_gpu(tmp_path, gpus, line):
    rendered = render(tmp_path, SETTINGS | {"torchserve_gpus": gpus})
    found = [text for text in rendered.splitlines() if text.startswith("number_of_gpu")]
    assert found == ([line] if line else [])


def test_a_cpu_service_renders_as_it_did_before_gpus_existed(tmp_path):
    with_default = render(tmp_path, SETTINGS)
    assert "gpu" not in with_default.lower()
    assert "\n\n" not in with_default
