"""The lab on real Docker: plain nodes from the golden template, SSH, Swarm over an overlay, the
registry, CPU budgets that bind, and a lab down that leaves the host as it found it. (site.yml's
VMs, provisioned through the Proxmox simulator, are tested in test_site.py.)

The tests run in file order against one lab of their own (its own name, subnet and state
directory), so a developer's lab is never touched; the last test takes it down.
"""

import os
import socket
import time
from pathlib import Path

import pytest
import requests
import yaml
from lab_support import REPO_ROOT, node_docker, run, wait_for

from lab.pvesim.config import DEFAULT_CONFIG

LAB_NAME = "mlfleet-test"
GATEWAY = "192.168.214.1"
REGISTRY = f"{GATEWAY}:5000"
NODE_CPUS = 0.5
NODES = [f"{LAB_NAME}-node-1", f"{LAB_NAME}-node-2"]
PROBE_IMAGE = f"{REGISTRY}/lab/probe:latest"
PVE_PORT = 18006
SERVICE = "probe"
OVERLAY = "probe-net"


def cgroup_dirs() -> set[str]:
    """Container cgroups the host's runtime made (cgroup v1 controllers or the v2 tree)."""
    found = set()
    for pattern in ("/sys/fs/cgroup/*/docker/*", "/sys/fs/cgroup/docker/*", "/sys/fs/cgroup/system.slice/docker-*"):
        found |= {str(p) for p in Path("/").glob(pattern.lstrip("/")) if p.is_dir()}
    return found


def host_snapshot(watched_paths) -> dict:
    return {
        "containers": set(run(["docker", "ps", "-aq", "--no-trunc"]).stdout.split()),
        "networks": set(run(["docker", "network", "ls", "-q", "--no-trunc"]).stdout.split()),
        "volumes": set(run(["docker", "volume", "ls", "-q"]).stdout.split()),
        "paths": {str(p): p.exists() for p in watched_paths},
        "cgroups": cgroup_dirs(),
    }


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (dockerd, debootstrap, host directories); run them through ./scripts/test as root")
    work = tmp_path_factory.mktemp("lab")
    inventory_dir = work / "inventory"
    inventory_dir.mkdir()
    env = {
        "MLFLEET_LAB_NAME": LAB_NAME,
        "MLFLEET_LAB_STATE": str(work / "state"),
        "MLFLEET_LAB_SUBNET": "192.168.214.0/24",
        "MLFLEET_LAB_GATEWAY": GATEWAY,
        "MLFLEET_LAB_NODES": str(len(NODES)),
        "MLFLEET_LAB_NODE_CPUS": str(NODE_CPUS),
        "MLFLEET_LAB_NODE_MEMORY": "1g",
        "MLFLEET_LAB_INVENTORY": str(inventory_dir / "lab_nodes.yml"),
        "MLFLEET_LAB_PVE_PORT": str(PVE_PORT),
    }
    watched = [work / "state", Path("/etc/docker/certs.d"), Path(f"/etc/docker/certs.d/{REGISTRY}"), inventory_dir / "lab_nodes.yml"]
    run([REPO_ROOT / "lab" / "dockerd.sh", "ensure"])
    before = host_snapshot(watched)
    state = {"env": env, "work": work, "inventory_dir": inventory_dir, "before": before, "watched": watched, "down": False}
    try:
        run([REPO_ROOT / "lab" / "up.sh"], env=env, timeout=900)
        yield state
    finally:
        if not state["down"]:
            run([REPO_ROOT / "lab" / "down.sh"], env=env, check=False)


@pytest.fixture(scope="module")
def pushed_probe(lab):
    """The probe image, built (cached) and pushed to the lab registry; nodes pull it from there."""
    run([REPO_ROOT / "lab" / "images" / "build.sh", "probe"], timeout=900)
    return run([REPO_ROOT / "lab" / "registry.sh", "push", "mlfleet-lab/probe:latest", "lab/probe"], env=lab["env"]).stdout.strip()


def container_ids(env) -> list[str]:
    return sorted(run(["docker", "ps", "-q", "--no-trunc", "--filter", f"label=io.mlfleet.lab={env['MLFLEET_LAB_NAME']}"]).stdout.split())


def test_lab_up_again_keeps_what_runs(lab):
    inventory = Path(lab["env"]["MLFLEET_LAB_INVENTORY"])
    first_ids, first_inventory = container_ids(lab["env"]), inventory.read_text()
    assert len(first_ids) == len(NODES)
    run([REPO_ROOT / "lab" / "up.sh"], env=lab["env"])
    assert container_ids(lab["env"]) == first_ids
    assert inventory.read_text() == first_inventory


def test_the_proxmox_simulator_answers_as_the_labs_proxmox(lab):
    ca_file = lab["work"] / "state" / "pvesim" / "ca.pem"
    url = f"https://127.0.0.1:{PVE_PORT}/api2/json/version"
    assert requests.get(url, verify=ca_file, timeout=10).status_code == 401
    secret = DEFAULT_CONFIG["users"]["root@pam"]["tokens"]["admin"]["secret"]
    answer = requests.get(url, verify=ca_file, timeout=10, headers={"Authorization": f"PVEAPIToken=root@pam!admin={secret}"})
    assert answer.status_code == 200
    assert answer.json()["data"]["version"]


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_nodes_answer_ansible_over_ssh_with_the_generated_key(lab):
    result = run(["ansible", "all", "-i", lab["inventory_dir"], "--one-line", "-m", "ansible.builtin.command", "-a", "docker info"])
    # One line a host: "<host> | CHANGED | rc=0 | (stdout) <output with \n escaped>"
    hosts = {line.split(" | ")[0]: line for line in result.stdout.splitlines() if " | " in line}
    assert sorted(hosts) == NODES
    for line in hosts.values():
        assert " | rc=0 | " in line, line
        assert "Server Version:" in line, line


def test_nodes_refuse_other_keys_and_have_their_own_host_keys(lab):
    stranger = lab["work"] / "stranger_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger])
    inventory = yaml.safe_load(Path(lab["env"]["MLFLEET_LAB_INVENTORY"]).read_text())
    address = inventory["all"]["children"]["swarm"]["children"]["swarm_managers"]["hosts"][NODES[0]]["ansible_host"]
    refused = run(
        ["ssh", "-i", stranger, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", f"root@{address}", "true"],
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr
    host_keys = {run(["docker", "exec", node, "cat", "/etc/ssh/ssh_host_ed25519_key.pub"]).stdout for node in NODES}
    assert len(host_keys) == len(NODES)


def test_lab_up_recreates_a_node_left_with_another_key(lab):
    """A node container left by an earlier lab of the same name (its state directory gone, or a run
    killed before lab down) lets in another key; lab up must replace it, not restart it."""
    stale_key = lab["work"] / "stale_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stale_key])
    node = NODES[1]
    stale_start = f'. lab/lib.sh && lab_remove_nodes {node} && lab_start_node {node} {node} {NODE_CPUS} 1g "$(cat {stale_key}.pub)" --ip 192.168.214.202'
    run(["bash", "-c", stale_start], env=lab["env"])
    stale_id = run(["docker", "inspect", "-f", "{{.Id}}", node]).stdout.strip()
    up = run([REPO_ROOT / "lab" / "up.sh"], env=lab["env"])
    assert f"node {node} was made for another state directory or key" in up.stderr
    assert run(["docker", "inspect", "-f", "{{.Id}}", node]).stdout.strip() != stale_id
    result = run(["ansible", node, "-i", lab["inventory_dir"], "--one-line", "-m", "ansible.builtin.command", "-a", "hostname"])
    assert f"{node} | CHANGED | rc=0 | (stdout) {node}" in result.stdout


def test_image_pushed_to_the_lab_registry_is_pulled_by_a_node(lab, pushed_probe):
    assert pushed_probe == PROBE_IMAGE
    host_image_id = run(["docker", "image", "inspect", "-f", "{{.Id}}", "mlfleet-lab/probe:latest"]).stdout.strip()
    for node in NODES:
        assert node_docker(node, "image", "inspect", PROBE_IMAGE, check=False).returncode != 0, f"{node} had the image before pulling"
        node_docker(node, "pull", "-q", PROBE_IMAGE)
        assert node_docker(node, "image", "inspect", "-f", "{{.Id}}", PROBE_IMAGE).stdout.strip() == host_image_id


def test_two_node_swarm_serves_a_replicated_service_on_an_overlay_from_both_nodes(lab, pushed_probe):
    manager, worker = NODES
    manager_ip = run(["docker", "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{LAB_NAME}").IPAddress}}}}', manager]).stdout.strip()
    node_docker(manager, "swarm", "init", "--advertise-addr", manager_ip)
    token = node_docker(manager, "swarm", "join-token", "-q", "worker").stdout.strip()
    node_docker(worker, "swarm", "join", "--token", token, f"{manager_ip}:2377")
    ready = node_docker(manager, "node", "ls", "--format", "{{.Hostname}} {{.Status}}").stdout.split("\n")
    assert sorted(line.split()[0] for line in ready if line.endswith("Ready")) == NODES

    node_docker(manager, "network", "create", "--driver", "overlay", "--attachable", OVERLAY)
    node_docker(
        manager, "service", "create", "--detach", "--name", SERVICE, "--replicas", "2", "--replicas-max-per-node", "1",
        "--endpoint-mode", "dnsrr", "--network", OVERLAY, "--no-resolve-image", PROBE_IMAGE,
    )  # fmt: skip

    def running_tasks():
        lines = node_docker(manager, "service", "ps", SERVICE, "--filter", "desired-state=running", "--format", "{{.Node}} {{.CurrentState}}").stdout
        nodes = sorted(line.split()[0] for line in lines.splitlines() if " Running " in f" {line} ")
        return nodes if len(nodes) == 2 else None

    assert wait_for("2 running probe tasks", running_tasks) == NODES

    # Each task's container host name is its container id; map them to the node that runs them.
    task_host_by_node = {}
    for node in NODES:
        ids = node_docker(node, "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={SERVICE}").stdout.split()
        assert len(ids) == 1, (node, ids)
        task_host_by_node[node] = ids[0][:12]

    # A client on the manager resolves tasks.<service> and asks every task: the worker's answer
    # crossed the overlay between the nodes.
    def client(*args):
        return node_docker(manager, "run", "--rm", "--network", OVERLAY, PROBE_IMAGE, *args).stdout.split()

    def both_task_addresses():
        addresses = client("resolve", f"tasks.{SERVICE}")
        return addresses if len(addresses) == 2 else None

    addresses = wait_for("tasks.probe to resolve to 2 addresses", both_task_addresses)
    answered = sorted(client("get", address)[0] for address in addresses)
    assert answered == sorted(task_host_by_node.values())


def node_cpu_seconds(node) -> float:
    """CPU time the node's cgroup has used (everything inside it, nested containers included)."""
    pid = run(["docker", "inspect", "-f", "{{.State.Pid}}", node]).stdout.strip()
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if "cpuacct" in line.split(":")[1].split(",")]
    if v1:
        return int(Path(f"/sys/fs/cgroup/cpuacct{v1[0]}/cpuacct.usage").read_text()) / 1e9
    unified = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
    stat = dict(line.split() for line in Path(f"/sys/fs/cgroup{unified}/cpu.stat").read_text().splitlines())
    return int(stat["usage_usec"]) / 1e6


def test_node_cpu_budget_binds_the_containers_it_runs(lab, pushed_probe):
    node = NODES[1]
    node_docker(node, "run", "-d", "--name", "burn", PROBE_IMAGE, "burn", "30")
    try:
        wait_for("the burn container to run", lambda: node_docker(node, "inspect", "-f", "{{.State.Running}}", "burn").stdout.strip() == "true")
        node_cgroup = run(["docker", "exec", node, "sh", "-c", "grep -E ':cpu(,|:)' /proc/1/cgroup | cut -d: -f3"]).stdout.strip()
        burn_pid = node_docker(node, "inspect", "-f", "{{.State.Pid}}", "burn").stdout.strip()
        burn_cgroup = run(["docker", "exec", node, "sh", "-c", f"grep -E ':cpu(,|:)' /proc/{burn_pid}/cgroup | cut -d: -f3"]).stdout.strip()
        assert burn_cgroup.startswith(f"{node_cgroup}/nested/"), (node_cgroup, burn_cgroup)

        time.sleep(1)  # past the start-up burst
        cpu_before, wall_before = node_cpu_seconds(node), time.monotonic()
        time.sleep(5)
        share = (node_cpu_seconds(node) - cpu_before) / (time.monotonic() - wall_before)
        print(f"node {node} with --cpus {NODE_CPUS}, a busy container inside: {share:.3f} CPU over 5 s")
        # Busy, yet held to the node's budget: 0.5 CPU with a tolerance for accounting granularity.
        assert 0.3 <= share <= NODE_CPUS * 1.2, f"node used {share:.2f} CPU with a budget of {NODE_CPUS}"
    finally:
        node_docker(node, "rm", "-f", "burn", check=False)


def test_lab_down_leaves_the_host_as_it_was(lab):
    images_before = set(run(["docker", "images", "-q", "--no-trunc", "mlfleet-lab/node"]).stdout.split())
    run([REPO_ROOT / "lab" / "down.sh"], env=lab["env"])
    lab["down"] = True
    after = host_snapshot(lab["watched"])
    assert after == lab["before"]
    assert not port_open(PVE_PORT), "the Proxmox simulator still listens"
    # The golden template is the build cache, not lab state.
    assert set(run(["docker", "images", "-q", "--no-trunc", "mlfleet-lab/node"]).stdout.split()) == images_before
