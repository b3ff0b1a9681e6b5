"""The swarm layer on lab nodes, each running its own dockerd: playbooks/configure.yml forms a swarm
of one manager and three workers from scratch, re-running it changes nothing, a node from a foreign
swarm is refused and then forced in, a worker leaves with state=absent while a 6-replica service runs
(sampled every 0.5 s), three managers survive the loss of one, and bad tokens or unreachable managers
fail with clear messages.

The tests run in file order against one lab of their own (name, subnet, state directory); the fixture
takes it down at the end.
"""

import json
import os
import re
import threading
import time

import pytest
import yaml
from lab_support import REPO_ROOT, node_docker, run, wait_for

from lab.environment import lab_environment

LAB_NAME = "mlfleet-swarmtest"
PREFIX = "192.168.217"
PVE_PORT = 18009
NODE_COUNT = 7
NODES = [f"{LAB_NAME}-node-{i}" for i in range(1, NODE_COUNT + 1)]
MANAGER, SPARE_MANAGERS, WORKERS, FOREIGN = NODES[0], NODES[1:3], NODES[3:6], NODES[6]
SERVICE = "probe"


def address(node):
    return f"{PREFIX}.{200 + NODES.index(node) + 1}"


def vmid(node):
    return 500 + NODES.index(node) + 1


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root; run them through ./scripts/test as root")
    work = tmp_path_factory.mktemp("swarm")
    state = work / "state"
    env = lab_environment(LAB_NAME, PREFIX, PVE_PORT, work, nodes=NODE_COUNT, node_memory="1g")
    try:
        run([REPO_ROOT / "lab" / "up.sh"], env=env, timeout=900)
        run([REPO_ROOT / "lab" / "images" / "build.sh", "probe"], timeout=900)
        image = run([REPO_ROOT / "lab" / "registry.sh", "push", "mlfleet-lab/probe:latest", "lab/probe"], env=env).stdout.strip()
        yield {"env": env, "work": work, "state": state, "image": image}
    finally:
        run([REPO_ROOT / "lab" / "down.sh"], env=env, check=False)


def write_inventory(lab, managers, workers, name="inventory.yml", **extra_vars):
    def hosts(nodes):
        return {node: {"ansible_host": address(node), "proxmox_vmid": vmid(node)} for node in nodes}

    inventory = {
        "all": {
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(lab["state"] / "ssh" / "id_ed25519"),
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
                "swarm_manager_overlay_encrypted": False,
                **extra_vars,
            },
            "children": {"swarm_managers": {"hosts": hosts(managers)}, "swarm_workers": {"hosts": hosts(workers)}},
        }
    }
    path = lab["work"] / name
    path.write_text(yaml.safe_dump(inventory))
    return path


def playbook(inventory, path, *extra, check=True, timeout=900):
    return run(["ansible-playbook", "-i", inventory, path, *extra], check=check, timeout=timeout)


def recap(output):
    return {host: dict(re.findall(r"(\w+)=(\d+)", counts)) for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.MULTILINE)}


def swarm_nodes(manager=MANAGER):
    """The node list as the manager sees it: hostname -> {role, status, availability, reachability, labels}."""
    ids = node_docker(manager, "node", "ls", "-q").stdout.split()
    records = json.loads(node_docker(manager, "node", "inspect", *ids).stdout)
    return {
        r["Description"]["Hostname"]: {
            "role": r["Spec"]["Role"],
            "status": r["Status"]["State"],
            "availability": r["Spec"]["Availability"],
            "reachability": (r.get("ManagerStatus") or {}).get("Reachability"),
            "labels": r["Spec"].get("Labels") or {},
        }
        for r in records
    }


def swarm_join_playbook(lab, node, **options):
    """A play that runs mlfleet.serving.swarm_join for one node from the control host, as the roles do."""
    task = {
        "mlfleet.serving.swarm_join": {
            "docker_host": f"ssh://root@{address(node)}",
            "ssh_private_key_file": str(lab["state"] / "ssh" / "id_ed25519"),
            "ssh_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            "managers": [f"ssh://root@{address(MANAGER)}"],
            "node_name": node,
            **options,
        },
        "register": "joined",
    }
    tasks = [task, {"ansible.builtin.debug": {"var": "joined"}}]
    play = [{"name": "swarm_join", "hosts": "localhost", "connection": "local", "gather_facts": False, "tasks": tasks}]
    path = lab["work"] / "swarm_join.yml"
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    return path


def test_configure_forms_one_manager_and_three_workers_from_scratch(lab):
    inventory = write_inventory(lab, [MANAGER], WORKERS)
    result = playbook(inventory, REPO_ROOT / "playbooks" / "configure.yml")
    assert all(counts["failed"] == "0" for counts in recap(result.stdout).values())
    nodes = swarm_nodes()
    assert sorted(nodes) == sorted([MANAGER, *WORKERS])
    assert nodes[MANAGER]["role"] == "manager" and nodes[MANAGER]["reachability"] == "reachable"
    for node in [MANAGER, *WORKERS]:
        assert nodes[node]["status"] == "ready" and nodes[node]["availability"] == "active", nodes[node]
        assert nodes[node]["labels"]["mlfleet.vmid"] == str(vmid(node))
    assert {nodes[w]["role"] for w in WORKERS} == {"worker"}
    assert {nodes[w]["labels"]["mlfleet.pool"] for w in WORKERS} == {"swarm_worker"}
    assert nodes[MANAGER]["labels"]["mlfleet.pool"] == "swarm_manager"
    network = json.loads(node_docker(MANAGER, "network", "inspect", "mlfleet").stdout)[0]
    assert network["Driver"] == "overlay" and "encrypted" not in (network.get("Options") or {})


def test_configure_again_changes_nothing(lab):
    inventory = write_inventory(lab, [MANAGER], WORKERS)
    result = playbook(inventory, REPO_ROOT / "playbooks" / "configure.yml")
    counts = recap(result.stdout)
    assert sorted(counts) == sorted([MANAGER, *WORKERS])
    assert {host: c["changed"] for host, c in counts.items()} == dict.fromkeys(counts, "0"), result.stdout


def test_a_node_from_a_foreign_swarm_is_refused_then_forced_in(lab):
    node_docker(FOREIGN, "swarm", "init", "--advertise-addr", address(FOREIGN))
    foreign_id = node_docker(FOREIGN, "info", "--format", "{{.Swarm.NodeID}}").stdout.strip()
    inventory = write_inventory(lab, [MANAGER], [*WORKERS, FOREIGN])
    worker_play = REPO_ROOT / "playbooks" / "configure.yml"
    refused = playbook(inventory, worker_play, "--limit", f"{MANAGER},{FOREIGN}", check=False)
    assert refused.returncode != 0
    assert f"Node {FOREIGN} is part of another swarm" in refused.stdout
    assert foreign_id in refused.stdout and "force: true" in refused.stdout
    assert FOREIGN not in swarm_nodes()
    assert node_docker(FOREIGN, "info", "--format", "{{.Swarm.NodeID}}").stdout.strip() == foreign_id, "a refused node must keep its swarm"

    forced = playbook(inventory, worker_play, "--limit", f"{MANAGER},{FOREIGN}", "-e", "swarm_worker_force=true")
    assert recap(forced.stdout)[FOREIGN]["changed"] != "0"
    nodes = swarm_nodes()
    assert nodes[FOREIGN]["status"] == "ready" and nodes[FOREIGN]["labels"]["mlfleet.vmid"] == str(vmid(FOREIGN))
    assert node_docker(FOREIGN, "info", "--format", "{{.Swarm.NodeID}}").stdout.strip() != foreign_id


def test_a_wrong_token_or_an_unreachable_manager_fails_clearly(lab):
    # The foreign node leaves again, so it is a node in no swarm.
    playbook(lab["work"] / "inventory.yml", swarm_join_playbook(lab, FOREIGN, state="absent"))
    assert FOREIGN not in swarm_nodes()
    wrong_token = "SWMTKN-1-3pu6hszjas19xyp7ghgosyx9k8atbfcr8p2is99znpy26u2lkl-1awxwuwd3z9j1z3puu7rcgdbx"
    refused = playbook(lab["work"] / "inventory.yml", swarm_join_playbook(lab, FOREIGN, join_token=wrong_token, retries=3), check=False)
    assert refused.returncode != 0
    assert f"refused node {FOREIGN} as worker" in refused.stdout and "did not accept the join_token given" in refused.stdout
    assert wrong_token not in refused.stdout + refused.stderr, "the token must not be printed"
    assert refused.stdout.count("attempts") == 0, "a rejected token is not retried"

    unreachable = f"ssh://root@{PREFIX}.250"
    play = swarm_join_playbook(lab, FOREIGN, managers=[unreachable], connect_timeout=3)
    failed = playbook(lab["work"] / "inventory.yml", play, check=False)
    assert failed.returncode != 0
    assert "No swarm manager answered" in failed.stdout and f"Cannot reach the Docker API at {unreachable} over SSH" in failed.stdout

    worker = f"ssh://root@{address(WORKERS[0])}"
    play = swarm_join_playbook(lab, FOREIGN, managers=[worker])
    failed = playbook(lab["work"] / "inventory.yml", play, check=False)
    assert failed.returncode != 0 and f"{worker} is a worker, not a manager" in failed.stdout


class TaskSampler(threading.Thread):
    """Samples every 0.5 s the running tasks of a service per node, and whether a node is still in the node list."""

    def __init__(self, service, watched_node):
        super().__init__(daemon=True)
        self.service, self.watched_node = service, watched_node
        self.samples = []
        self.stopping = threading.Event()

    def run(self):
        deadline = time.monotonic() + 600
        while not self.stopping.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            rows = node_docker(MANAGER, "service", "ps", self.service, "--format", "{{.Node}} {{.DesiredState}} {{.CurrentState}}", check=False).stdout
            running = [line.split()[0] for line in rows.splitlines() if line.split()[1:3] == ["Running", "Running"]]
            listed = self.watched_node in node_docker(MANAGER, "node", "ls", "--format", "{{.Hostname}}", check=False).stdout.split()
            self.samples.append({"t": started, "running": len(running), "on_node": running.count(self.watched_node), "node_listed": listed})
            self.stopping.wait(max(0.0, 0.5 - (time.monotonic() - started)))


def test_a_worker_leaves_while_a_six_replica_service_keeps_running(lab):
    node_docker(
        MANAGER, "service", "create", "--detach", "--name", SERVICE, "--replicas", "6", "--no-resolve-image",
        "--endpoint-mode", "dnsrr", "--network", "mlfleet", "--stop-grace-period", "3s", lab["image"],
    )  # fmt: skip

    def placement():
        rows = node_docker(MANAGER, "service", "ps", SERVICE, "--filter", "desired-state=running", "--format", "{{.Node}} {{.CurrentState}}").stdout
        running = [line.split()[0] for line in rows.splitlines() if line.split()[1] == "Running"]
        return running if len(running) == 6 else None

    running = wait_for("6 running probe tasks", placement, timeout=180)
    leaving = max(WORKERS, key=running.count)
    moved = running.count(leaving)
    assert moved >= 1

    sampler = TaskSampler(SERVICE, leaving)
    sampler.start()
    try:
        result = playbook(lab["work"] / "inventory.yml", swarm_join_playbook(lab, leaving, state="absent", drain_timeout=180))
    finally:
        time.sleep(2)
        sampler.stopping.set()
        sampler.join(30)
    samples = sampler.samples
    assert len(samples) >= 6, samples
    lowest = min(s["running"] for s in samples)
    print(f"\n{leaving} ran {moved} of 6 tasks; {len(samples)} samples, running tasks never below {lowest}")
    print("running tasks per sample:", " ".join(str(s["running"]) + ("" if s["node_listed"] else "x") for s in samples))
    # The issue asks for never below 5 of 6; the drain surge keeps all 6 running.
    assert lowest >= 6, samples
    gone = [s for s in samples if not s["node_listed"]]
    assert gone, "the node never left the node list while sampled"
    first_gone = samples.index(gone[0])
    assert samples[first_gone - 1]["on_node"] == 0 and samples[first_gone - 1]["running"] >= 6, samples[first_gone - 3 : first_gone + 1]
    assert f"surged {SERVICE} by {moved} replicas" in result.stdout
    assert json.loads(node_docker(MANAGER, "service", "inspect", SERVICE).stdout)[0]["Spec"]["Mode"]["Replicated"]["Replicas"] == 6
    assert not any(k.startswith("mlfleet.drain-surge") for k in json.loads(node_docker(MANAGER, "service", "inspect", SERVICE).stdout)[0]["Spec"]["Labels"])
    assert node_docker(leaving, "info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() == "inactive"

    # Back in: the next test needs all three workers.
    playbook(lab["work"] / "inventory.yml", swarm_join_playbook(lab, leaving, vmid=vmid(leaving), pool="swarm_worker"))
    assert swarm_nodes()[leaving]["status"] == "ready"


def test_three_managers_survive_the_loss_of_one(lab):
    inventory = write_inventory(lab, [MANAGER, *SPARE_MANAGERS], WORKERS, name="three-managers.yml")
    playbook(inventory, REPO_ROOT / "playbooks" / "configure.yml", "--limit", "swarm_managers")
    nodes = swarm_nodes()
    assert [n for n in nodes if nodes[n]["role"] == "manager" and nodes[n]["reachability"] == "reachable"] == sorted([MANAGER, *SPARE_MANAGERS])

    lost = SPARE_MANAGERS[0]
    run(["docker", "kill", lost])
    try:
        survivors = wait_for(
            f"the managers to see {lost} unreachable",
            lambda: (n := swarm_nodes()) and n[lost]["reachability"] == "unreachable" and n,
            timeout=60,
        )
        assert survivors[SPARE_MANAGERS[1]]["reachability"] == "reachable"
        # Quorum holds (2 of 3): the swarm still takes writes, and Ansible still works through a manager list
        # whose first entry is the lost one.
        node_docker(MANAGER, "service", "scale", "--detach", f"{SERVICE}=4")
        play = swarm_join_playbook(
            lab, WORKERS[0], managers=[f"ssh://root@{address(lost)}", f"ssh://root@{address(MANAGER)}"], connect_timeout=3,
            labels={"survived": "yes"}, vmid=vmid(WORKERS[0]), pool="swarm_worker",
        )  # fmt: skip
        playbook(inventory, play)
        assert swarm_nodes()[WORKERS[0]]["labels"]["survived"] == "yes"
    finally:
        run(["docker", "start", lost])
    wait_for(f"{lost} back as a reachable manager", lambda: swarm_nodes()[lost]["reachability"] == "reachable", timeout=120)


def swarm_service_playbook(lab, name, **options):
    """A play that runs mlfleet.serving.swarm_service against the first manager from the control host."""
    task = {
        "mlfleet.serving.swarm_service": {
            "docker_host": f"ssh://root@{address(MANAGER)}",
            "ssh_private_key_file": str(lab["state"] / "ssh" / "id_ed25519"),
            "ssh_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            "name": name,
            **options,
        },
        "register": "service",
    }
    tasks = [task, {"ansible.builtin.debug": {"var": "service"}}]
    path = lab["work"] / f"swarm_service_{name}.yml"
    path.write_text(yaml.safe_dump([{"name": "swarm_service", "hosts": "localhost", "connection": "local", "gather_facts": False, "tasks": tasks}]))
    return path


def service_spec(name):
    return json.loads(node_docker(MANAGER, "service", "inspect", name).stdout)[0]


def task_ids(name):
    return set(node_docker(MANAGER, "service", "ps", name, "-q", "--filter", "desired-state=running").stdout.split())


def test_swarm_service_converges_rotates_files_and_cleans_up(lab):
    secret_value = "token-3f9a1c7e5b2d4860"
    options = {
        "image": lab["image"], "replicas": 2, "networks": ["mlfleet"], "endpoint_mode": "dnsrr", "env": {"GREETING": "hello"},
        "constraints": ["node.role==worker"], "spread": ["node.id"], "limit_cpus": 0.25, "reserve_cpus": 0.1, "limit_memory": "128M",
        "configs": [{"target": "/etc/probe.conf", "content": "greeting=hello\n"}],
        "secrets": [{"target": "probe-token", "content": secret_value}],
        "healthcheck": {"test": ["CMD", "python3", "-c", "print(1)"], "interval": "5s", "timeout": "3s"},
        "update_config": {"order": "start-first", "failure_action": "rollback"}, "stop_grace_period": "3s",
    }  # fmt: skip
    inventory = lab["work"] / "inventory.yml"
    created = playbook(inventory, swarm_service_playbook(lab, "echo", **options))
    assert "created service echo" in created.stdout and "running_tasks: 2" in created.stdout
    spec = service_spec("echo")["Spec"]
    assert spec["TaskTemplate"]["Resources"]["Limits"]["MemoryBytes"] == 128 * 1024**2
    assert spec["TaskTemplate"]["Placement"]["Constraints"] == ["node.role==worker"]
    first_tasks = task_ids("echo")

    again = playbook(inventory, swarm_service_playbook(lab, "echo", **options))
    assert recap(again.stdout)["localhost"]["changed"] == "0" and task_ids("echo") == first_tasks

    # Another replica count set by hand (as the autoscaler would) survives keep_replicas.
    node_docker(MANAGER, "service", "scale", "--detach", "echo=3")
    kept = playbook(inventory, swarm_service_playbook(lab, "echo", keep_replicas=True, **options))
    assert recap(kept.stdout)["localhost"]["changed"] == "0" and service_spec("echo")["Spec"]["Mode"]["Replicated"]["Replicas"] == 3

    options |= {
        "configs": [{"target": "/etc/probe.conf", "content": "greeting=bonjour\n"}],
        "secrets": [{"target": "probe-token", "content": secret_value + "-2"}],
    }
    rotated = playbook(inventory, swarm_service_playbook(lab, "echo", **options))
    assert "updated service echo" in rotated.stdout and "removed unused config" in rotated.stdout and "removed unused secret" in rotated.stdout
    assert service_spec("echo")["Spec"]["Mode"]["Replicated"]["Replicas"] == 2
    configs = node_docker(MANAGER, "config", "ls", "--format", "{{.Name}}").stdout.split()
    assert len([c for c in configs if c.startswith("echo_")]) == 1
    task = next(iter(task_ids("echo")))
    container = json.loads(node_docker(MANAGER, "inspect", task).stdout)[0]["Status"]["ContainerStatus"]["ContainerID"]
    node = json.loads(node_docker(MANAGER, "inspect", task).stdout)[0]["NodeID"]
    host = json.loads(node_docker(MANAGER, "node", "inspect", node).stdout)[0]["Description"]["Hostname"]
    assert node_docker(host, "exec", container, "cat", "/etc/probe.conf").stdout == "greeting=bonjour\n"
    assert node_docker(host, "exec", container, "cat", "/run/secrets/probe-token").stdout == secret_value + "-2"
    for output in (created, again, kept, rotated):
        assert secret_value not in output.stdout + output.stderr, "a secret's content must never be printed"
    secret_labels = node_docker(MANAGER, "secret", "ls", "--format", "{{.Name}} {{.Labels}}").stdout
    assert secret_value not in secret_labels and "pbkdf2-sha256:200000:" in secret_labels

    removed = playbook(inventory, swarm_service_playbook(lab, "echo", state="absent"))
    assert "removed service echo" in removed.stdout
    assert "echo" not in node_docker(MANAGER, "service", "ls", "--format", "{{.Name}}").stdout.split()
    leftovers = (
        node_docker(MANAGER, "secret", "ls", "--format", "{{.Name}}").stdout.split()
        + node_docker(MANAGER, "config", "ls", "--format", "{{.Name}}").stdout.split()
    )
    assert [n for n in leftovers if n.startswith("echo_")] == []
