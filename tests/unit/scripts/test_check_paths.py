"""scripts/check_paths.py, which ./scripts/lint runs: it fails on paths that exist on one machine only, in files git
tracks or would track, and passes paths that are a product's or an image's own. Each case is a file in a fresh git
repository; the flagged strings are assembled here so that this file does not flag itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHECKER = Path(__file__).resolve().parents[3] / "scripts" / "check_paths.py"
SHARED = ".." + "/shared"
WORK = "/" + "work"
ROOT = "/" + "root"
HOME = "/" + "home"


def check(tmp_path: Path, files: dict[str, str], ignored: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("".join(f"{name}\n" for name in ignored))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return subprocess.run([sys.executable, str(CHECKER), str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    "name, text, finding",
    [
        ("tests/lab/support.py", f'SAMPLE = REPO / "{SHARED}/grafana/sample.json"\n', f"names {SHARED}"),
        ("README.md", f"See [the design]({SHARED}/DESIGN.md).\n", f"names {SHARED}"),
        ("tests/lab/support.py", f'"""Shaped like {WORK}/shared/grafana/sample.json."""\n', f"absolute {WORK} path"),
        ("docs/notes.md", f"Run `{WORK}/main/scripts/site`.\n", f"absolute {WORK} path"),
        ("bench/run.py", f'CACHE = "{ROOT}/.cache/mlfleet"\n', f"home directory {ROOT} "),
        ("plugins/x.py", f"    lease_file: {HOME}/alice/.local/share/lease\n", f"home directory {HOME}/alice "),
    ],
)
def test_a_path_of_one_machine_fails_naming_the_file_line_and_fix(tmp_path, name, text, finding):
    result = check(tmp_path, {name: "first line\n" + text})
    assert result.returncode == 1, result.stdout
    assert result.stdout.startswith(f"{name}:2: ") and finding in result.stdout


@pytest.mark.parametrize(
    "name, text",
    [
        ("roles/torchserve/tasks/service.yml", f"target: {HOME}/model-server/model-store\n"),  # the TorchServe image's home
        ("lab/images/node/init", f"install -d -m 700 {ROOT}/.ssh\n"),  # inside the image the lab builds
        ("tests/lab/test_swarm.py", 'docker_host = f"ssh://root@{address}"\n'),  # a user name in a URL
        ("lab/images/build.sh", f'rm -rf "$ROOTFS{ROOT}/.cache"\n'),
        ("scripts/site", 'LAB_CACHE="$HOME/.cache/mlfleet-lab"\n'),
        ("docs/guide.md", "Keep the lease in ~/.local/share/mlfleet or /var/lib/mlfleet.\n"),
        ("tests/fixtures/sample.json", '{"path": "tests/fixtures/grafana"}\n'),
    ],
)
def test_paths_that_are_not_one_machines_pass(tmp_path, name, text):
    result = check(tmp_path, {name: text})
    assert result.returncode == 0, result.stdout


def test_ignored_and_binary_files_are_not_read(tmp_path):
    result = check(tmp_path, {".venv/lib/site.py": f"{ROOT}/.pyenv\n", "bench/plot.png": f"\0{WORK}/main\n"}, ignored=(".venv/",))
    assert result.returncode == 0, result.stdout
