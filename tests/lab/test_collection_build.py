"""The collection as another team gets it: built, installed from the tarball, documented, runnable."""

import json
import sys
import tarfile

import pytest
import yaml
from lab_support import REPO_ROOT, run

GALAXY = yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())
# Plugin folders that ansible-doc documents (module_utils and doc_fragments are not plugins of their own).
DOCUMENTED_PLUGIN_TYPES = {
    "modules": "module",
    "inventory": "inventory",
    "callback": "callback",
    "filter": "filter",
    "lookup": "lookup",
    "connection": "connection",
    "test": "test",
}
# What a user of the collection gets; anything else at the top level is development material
# that build_ignore in galaxy.yml must leave out.
PRODUCT_TOP_LEVEL = {
    "MANIFEST.json", "FILES.json", "README.md", "COPYING", "requirements.txt", "site.yml",
    "meta", "playbooks", "plugins", "roles", "extensions", "changelogs", "inventories", "docs", "models",
}  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("galaxy")
    collections = work / "collections"
    # Only the installed copy is visible: no ansible.cfg of this repository, no link to the checkout.
    env = {"ANSIBLE_COLLECTIONS_PATH": str(collections), "ANSIBLE_CONFIG": str(work / "none.cfg")}
    run(["ansible-galaxy", "collection", "build", "--output-path", work / "dist", REPO_ROOT], env=env, cwd=work)
    (tarball,) = (work / "dist").glob("mlfleet-serving-*.tar.gz")
    run(["ansible-galaxy", "collection", "install", "--offline", "-p", collections, tarball], env=env, cwd=work)
    return {"tarball": tarball, "collections": collections, "env": env, "cwd": work}


def test_tarball_leaves_out_development_files(installed):
    with tarfile.open(installed["tarball"]) as archive:
        members = [m.name for m in archive.getmembers()]
    assert {m.split("/", 1)[0] for m in members} <= PRODUCT_TOP_LEVEL
    assert [m for m in members if "/molecule/" in f"/{m}/" or m.startswith("inventories/lab")] == []
    for required in ("MANIFEST.json", "FILES.json", "README.md", "meta/runtime.yml", "meta/extensions.yml", "playbooks/site.yml", "requirements.txt"):
        assert required in members


def test_installed_version_matches_galaxy_yml(installed):
    listing = run(["ansible-galaxy", "collection", "list", "--format", "json", "-p", installed["collections"]], env=installed["env"], cwd=installed["cwd"])
    versions = {name: info["version"] for per_path in json.loads(listing.stdout).values() for name, info in per_path.items()}
    assert versions.get("mlfleet.serving") == GALAXY["version"]


def source_plugins() -> set[tuple[str, str]]:
    found = set()
    for folder, doc_type in DOCUMENTED_PLUGIN_TYPES.items():
        # A filter file may hold several filters; each has its own <name>.yml documentation beside it.
        for path in (REPO_ROOT / "plugins" / folder).glob("*.yml" if folder == "filter" else "*.py"):
            if not path.name.startswith("_"):
                found.add((doc_type, f"mlfleet.serving.{path.stem}"))
    return found


def test_ansible_doc_lists_and_renders_every_plugin_from_the_installed_copy(installed):
    listed = set()
    for doc_type in DOCUMENTED_PLUGIN_TYPES.values():
        result = run(["ansible-doc", "-t", doc_type, "-l", "mlfleet.serving", "--json"], env=installed["env"], cwd=installed["cwd"])
        listed |= {(doc_type, name) for name in json.loads(result.stdout)}
    assert listed == source_plugins()
    for doc_type, name in sorted(listed):
        rendered = run(["ansible-doc", "-t", doc_type, name], env=installed["env"], cwd=installed["cwd"])
        assert name.rsplit(".", 1)[1] in rendered.stdout


def test_ansible_doc_renders_every_role_from_the_installed_copy(installed):
    roles = {p.name for p in (REPO_ROOT / "roles").glob("*") if (p / "meta" / "argument_specs.yml").exists()}
    result = run(["ansible-doc", "-t", "role", "-l", "mlfleet.serving", "--json"], env=installed["env"], cwd=installed["cwd"])
    assert {name.rsplit(".", 1)[1] for name in json.loads(result.stdout)} == roles
    for role in sorted(roles):
        run(["ansible-doc", "-t", "role", f"mlfleet.serving.{role}"], env=installed["env"], cwd=installed["cwd"])


def test_installed_site_playbook_resolves_by_fqcn(installed):
    result = run(["ansible-playbook", "--syntax-check", "mlfleet.serving.site"], env=installed["env"], cwd=installed["cwd"])
    installed_playbook = installed["collections"] / "ansible_collections" / "mlfleet" / "serving" / "playbooks" / "site.yml"
    assert f"playbook: {installed_playbook}" in result.stdout


def test_installed_rulebook_finds_its_event_sources_and_playbooks_by_fqcn(installed):
    """What `ansible-rulebook --rulebook mlfleet.serving.autoscale` resolves, from the installed copy only."""
    probe = """
import json
import yaml
from ansible_rulebook import collection as c
location = c.find_object("mlfleet.serving", "autoscale", [f"{c.EDA_PATH_PREFIX}/rulebooks"], ".yml")
with open(location, encoding="utf-8") as stream:
    rulebook = yaml.safe_load(stream)
sources = [key for ruleset in rulebook for source in ruleset["sources"] for key in source if key != "name"]
playbooks = [rule["action"]["run_playbook"]["name"] for ruleset in rulebook for rule in ruleset["rules"]]
print(json.dumps({
    "sources": {s: c.find_source(*c.split_collection_name(s)) for s in sources},
    "playbooks": {p: c.find_playbook(*c.split_collection_name(p)) for p in playbooks},
}))
"""
    found = json.loads(run([sys.executable, "-c", probe], env=installed["env"], cwd=installed["cwd"]).stdout)
    root = str(installed["collections"] / "ansible_collections" / "mlfleet" / "serving")
    assert set(found["sources"]) == {"mlfleet.serving.grafana_alerts", "mlfleet.serving.serving_pressure", "mlfleet.serving.scale_schedule"}
    assert set(found["playbooks"]) == {"mlfleet.serving.scale_out", "mlfleet.serving.scale_in"}
    assert all(path.startswith(root) for path in [*found["sources"].values(), *found["playbooks"].values()]), found
    for playbook in ("scale_out", "scale_in", "scale_replicas", "teardown"):
        run(["ansible-playbook", "--syntax-check", f"mlfleet.serving.{playbook}"], env=installed["env"], cwd=installed["cwd"])
