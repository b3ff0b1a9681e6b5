"""Every role's molecule scenario (create, converge, idempotence, verify, destroy) on lab nodes.

Each scenario brings up a lab of its own (see its molecule.yml) through tests/molecule/create.yml and
takes it down again, so scenarios never share Docker state with each other or with other tests.
"""

import os

import pytest
from lab_support import REPO_ROOT, run

ROLES = sorted(p.name for p in (REPO_ROOT / "roles").iterdir() if p.is_dir())


def test_every_role_has_a_molecule_scenario():
    missing = [role for role in ROLES if not (REPO_ROOT / "roles" / role / "molecule" / "default" / "molecule.yml").is_file()]
    assert ROLES and missing == []


@pytest.mark.parametrize("role", ROLES)
def test_molecule_scenario(role):
    if os.geteuid() != 0:
        pytest.fail("the molecule scenarios start lab nodes and need root; run them through ./scripts/test")
    result = run(["molecule", "test"], cwd=REPO_ROOT / "roles" / role, env={"MLFLEET_REPO": str(REPO_ROOT), "NO_COLOR": "1"}, check=False, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for step in ("converge", "idempotence", "verify"):
        assert f"{step}: Executed: Successful" in output, f"{role}: {step} did not run\n{output[-3000:]}"
