"""swarm_join's main() in-process against an in-memory swarm.

The fake below stands in for docker.APIClient (the tests of swarm_cluster and swarm_nodes_info use
it too): one Engine per Docker API URL, the cluster state (nodes, services, tasks, networks) shared
by the engines of one swarm. Every call is checked against the SDK's own signature, every write is
logged in order, and a small scheduler moves tasks as a real swarm would: new tasks start as
pending and run at the next task listing, drained nodes stop theirs, surplus replicas go first
where they are not running yet, and a node that is down cannot report its tasks stopping.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json

import docker
import pytest
from ansible.module_utils import _internal as module_utils_internal
from ansible.module_utils.common import warnings as module_warnings
from ansible.module_utils.testing import patch_module_args
from docker.errors import APIError, DockerException

from ansible_collections.mlfleet.serving.plugins.module_utils import _swarm
from ansible_collections.mlfleet.serving.plugins.modules import swarm_join

SDK = docker.APIClient
NOT_A_MANAGER = (
    "This node is not a swarm manager. Worker nodes can't be used to view or modify cluster state. "
    "Please run this command on a manager node or promote the current node to a manager."
)
LOCKED = 'Swarm is encrypted and needs to be unlocked before it can be used. Please use "docker swarm unlock" to unlock it.'
NOT_IN_SWARM = "This node is not part of a swarm"
ALREADY_IN_SWARM = 'This node is already part of a swarm. Use "docker swarm leave" to leave this swarm and join another one.'
BAD_TOKEN = "rpc error: code = InvalidArgument desc = A valid join token is necessary to join this cluster"
OUT_OF_SEQUENCE = "rpc error: code = Unknown desc = update out of sequence"
JOIN_TIMEOUT = "Timeout was reached before node joined. The attempt to join the swarm will continue in the background."


def api_error(explanation):
    return APIError("500 Server Error: Internal Server Error", explanation=explanation)


def wire(value):
    """What crosses the API: JSON only, and never an object the module keeps a reference to."""
    return json.loads(json.dumps(value))


def sdk_call(method):
    """Bind each call to docker.APIClient's own signature, so a call the SDK would reject fails here too."""
    signature = inspect.signature(getattr(SDK, method.__name__))

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        signature.bind(self, *args, **kwargs)
        return wire(method(self, *args, **kwargs))

    return checked


def matches(value, wanted):
    return value in ([wanted] if isinstance(wanted, str) else wanted)


class Swarm:
    """The cluster state the managers of one swarm share."""

    def __init__(self, lab, cluster_id, autolock=False):
        self.lab = lab
        self.id = cluster_id
        self.version = lab.next_index()
        self.spec = {"Name": "default", "Orchestration": {"TaskHistoryRetentionLimit": 5}, "EncryptionConfig": {"AutoLockManagers": autolock}}
        self.tokens = {"Worker": f"SWMTKN-1-{cluster_id}-worker", "Manager": f"SWMTKN-1-{cluster_id}-manager"}
        self.unlock_key = f"SWMKEY-1-{cluster_id}"
        self.default_addr_pool = ["10.0.0.0/8"]
        self.nodes = {}
        self.services = {}
        self.tasks = []
        self.networks = {}
        # The fewest running tasks each replicated service had at any time: what a drain cost it.
        self.fewest_running = {}
        # Services whose tasks were all replaced because an update changed their task template.
        self.restarts = []

    # Set-up and inspection helpers for the tests.

    def add_node(self, engine, role, availability="active", labels=None):
        node_id = f"id-{engine.name}-{next(self.lab.ids)}"
        record = {
            "ID": node_id,
            "Version": {"Index": self.lab.next_index()},
            "Spec": {"Role": role, "Availability": availability, "Labels": dict(labels or {})},
            "Description": {"Hostname": engine.name},
            "Status": {"State": "ready", "Addr": engine.address},
        }
        if role == "manager":
            leader = not any("ManagerStatus" in n for n in self.nodes.values())
            record["ManagerStatus"] = {"Leader": leader, "Reachability": "reachable", "Addr": f"{engine.address}:2377"}
        self.nodes[node_id] = record
        engine.swarm, engine.node_id, engine.state = self, node_id, "active"
        self.reconcile()
        return record

    def node(self, hostname):
        return next(n for n in self.nodes.values() if n["Description"]["Hostname"] == hostname)

    def set_spec(self, hostname, **changes):
        self.node(hostname)["Spec"].update(changes)
        self.reconcile()

    def node_down(self, hostname):
        record = self.node(hostname)
        record["Status"]["State"] = "down"
        if "ManagerStatus" in record:
            record["ManagerStatus"]["Reachability"] = "unreachable"
        self.lab.engine(hostname).reachable = False
        self.reconcile()

    def add_service(self, name, replicas=None, networks=(), labels=None):
        mode = {"Global": {}} if replicas is None else {"Replicated": {"Replicas": replicas}}
        template = {"ContainerSpec": {"Image": f"registry.example/{name}:1"}, "ForceUpdate": 0, "Networks": [{"Target": n} for n in networks]}
        spec = {"Name": name, "Labels": dict(labels or {}), "Mode": mode, "TaskTemplate": template}
        spec.update(UpdateConfig={"Parallelism": 1, "Order": "start-first"}, EndpointSpec={"Mode": "vip"})
        service = {"ID": f"svc-{name}", "Version": {"Index": self.lab.next_index()}, "Spec": spec}
        self.services[service["ID"]] = service
        self.reconcile()
        self.start_tasks()
        self.fewest_running[name] = self.running(service)
        return service

    def add_network(self, name, encrypted, attachable=True, subnet="10.0.9.0/24"):
        network_id = f"{name}-{next(self.lab.ids)}".ljust(25, "0")
        options = {"com.docker.network.driver.overlay.vxlanid_list": "4097"}
        if encrypted:
            options["encrypted"] = ""
        self.networks[network_id] = {
            "Name": name,
            "Id": network_id,
            "Driver": "overlay",
            "Scope": "swarm",
            "Attachable": attachable,
            "Options": options,
            "Labels": {},
            "IPAM": {"Driver": "default", "Config": [{"Subnet": subnet}]},
        }
        return network_id

    def tasks_on(self, hostname, state="running"):
        node_id = self.node(hostname)["ID"]
        return sorted(self.services[t["ServiceID"]]["Spec"]["Name"] for t in self.tasks if t["NodeID"] == node_id and t["Status"]["State"] == state)

    def running(self, service):
        return sum(1 for t in self.tasks if t["ServiceID"] == service["ID"] and t["DesiredState"] == "running" and t["Status"]["State"] == "running")

    # What the managers do.

    def record(self, node_id):
        if node_id not in self.nodes:
            raise api_error(f"node {node_id} not found")
        return self.nodes[node_id]

    def service(self, key):
        for service in self.services.values():
            if key in (service["ID"], service["Spec"]["Name"]):
                return service
        raise api_error(f"service {key} not found")

    def set_node_spec(self, record, spec):
        record["Spec"] = wire(spec)
        record["Version"]["Index"] = self.lab.next_index()
        if spec["Role"] == "manager" and "ManagerStatus" not in record:
            record["ManagerStatus"] = {"Leader": False, "Reachability": "reachable", "Addr": f"{record['Status']['Addr']}:2377"}
        elif spec["Role"] == "worker":
            record.pop("ManagerStatus", None)
        self.reconcile()

    def restart(self, service):
        self.restarts.append(service["Spec"]["Name"])
        for task in self.tasks:
            if task["ServiceID"] == service["ID"] and task["DesiredState"] == "running":
                self.stop(task)

    def schedulable(self):
        return [n for n in self.nodes.values() if n["Status"]["State"] == "ready" and n["Spec"]["Availability"] == "active"]

    def place(self, service, node):
        seq = next(self.lab.ids)
        self.tasks.append(
            {"ID": f"task-{seq}", "Seq": seq, "ServiceID": service["ID"], "NodeID": node["ID"], "DesiredState": "running", "Status": {"State": "pending"}}
        )

    def stop(self, task):
        task["DesiredState"] = "shutdown"
        node = self.nodes.get(task["NodeID"])
        # A node that is down cannot report that its task stopped: the manager keeps its last known state.
        if node is None or node["Status"]["State"] != "down":
            task["Status"]["State"] = "shutdown"

    def reconcile(self):
        for task in self.tasks:
            node = self.nodes.get(task["NodeID"])
            gone = node is None or node["Spec"]["Availability"] == "drain" or node["Status"]["State"] == "down"
            if task["DesiredState"] == "running" and gone:
                self.stop(task)
        for service in self.services.values():
            live = [t for t in self.tasks if t["ServiceID"] == service["ID"] and t["DesiredState"] == "running"]
            mode = service["Spec"]["Mode"]
            if "Global" in mode:
                placed = {t["NodeID"] for t in live}
                for node in self.schedulable():
                    if node["ID"] not in placed:
                        self.place(service, node)
                continue
            replicas = mode["Replicated"]["Replicas"]
            surplus = sorted(live, key=lambda t: (t["Status"]["State"] == "running", -t["Seq"]))[: max(0, len(live) - replicas)]
            for task in surplus:
                self.stop(task)
            for _slot in range(replicas - len(live)):
                loads = {n["ID"]: self.load(n, service) for n in self.schedulable()}
                if not loads:
                    break
                self.place(service, self.nodes[min(loads, key=lambda node_id: (loads[node_id], node_id))])
        self.note_running()

    def load(self, node, service):
        return sum(1 for t in self.tasks if t["NodeID"] == node["ID"] and t["ServiceID"] == service["ID"] and t["DesiredState"] == "running")

    def start_tasks(self):
        for task in self.tasks:
            node = self.nodes.get(task["NodeID"])
            if task["DesiredState"] == "running" and task["Status"]["State"] == "pending" and node and node["Status"]["State"] == "ready":
                task["Status"]["State"] = "running"
        self.note_running()

    def note_running(self):
        for service in self.services.values():
            name = service["Spec"]["Name"]
            if name in self.fewest_running:
                self.fewest_running[name] = min(self.fewest_running[name], self.running(service))


class Engine:
    """The Docker Engine API of one node; also the docker.APIClient the modules get for its URL."""

    _version = "1.45"
    # Not empty, so the SDK's update_service reads no Docker config (or credential helper) of this host.
    _auth_configs = docker.auth.AuthConfig({"auths": {"registry.invalid": {}}})
    credstore_env = None

    def __init__(self, lab, name, address):
        self.lab = lab
        self.name = name
        self.address = address
        self.url = f"unix:///run/fake/{name}.sock"
        self.swarm = None
        self.node_id = ""
        self.state = "inactive"
        self.reachable = True
        self.join_failures = []
        self.opened = self.closed = 0

    @property
    def is_manager(self):
        record = self.swarm.nodes.get(self.node_id) if self.swarm and self.state == "active" else None
        return bool(record and record["Spec"]["Role"] == "manager")

    def cluster(self):
        if self.state == "locked":
            raise api_error(LOCKED)
        if not self.is_manager:
            raise api_error(NOT_A_MANAGER)
        return self.swarm

    def leave(self):
        record = self.swarm.nodes.get(self.node_id)
        if record:
            record["Status"]["State"] = "down"
            if "ManagerStatus" in record:
                record["ManagerStatus"]["Reachability"] = "unreachable"
        self.swarm, self.node_id, self.state = None, "", "inactive"

    @sdk_call
    def info(self):
        swarm = {"NodeID": self.node_id, "NodeAddr": "", "LocalNodeState": self.state, "ControlAvailable": self.is_manager, "Error": "", "RemoteManagers": None}
        if self.state == "active":
            swarm["NodeAddr"] = self.address
            swarm["RemoteManagers"] = [{"NodeID": n["ID"], "Addr": n["ManagerStatus"]["Addr"]} for n in self.swarm.nodes.values() if "ManagerStatus" in n]
            if self.is_manager:
                swarm["Cluster"] = {"ID": self.swarm.id}
        return {"Name": self.name, "Swarm": swarm}

    @sdk_call
    def inspect_swarm(self):
        swarm = self.cluster()
        return {
            "ID": swarm.id,
            "Version": {"Index": swarm.version},
            "Spec": swarm.spec,
            "JoinTokens": swarm.tokens,
            "DefaultAddrPool": swarm.default_addr_pool,
            "SubnetSize": 24,
        }

    def create_swarm_spec(self, *args, **kwargs):
        return SDK.create_swarm_spec(self, *args, **kwargs)

    @sdk_call
    def init_swarm(self, advertise_addr=None, listen_addr="0.0.0.0:2377", force_new_cluster=False, swarm_spec=None, default_addr_pool=None, **_):
        self.lab.writes.append(("init_swarm", self.name, wire(swarm_spec)))
        if self.state != "inactive":
            raise api_error(ALREADY_IN_SWARM)
        swarm = self.lab.new_swarm(f"cluster-{self.name}")
        swarm.spec.update(wire(swarm_spec or {}))
        swarm.default_addr_pool = default_addr_pool or swarm.default_addr_pool
        return swarm.add_node(self, "manager")["ID"]

    @sdk_call
    def update_swarm(self, version, swarm_spec=None, **_):
        swarm = self.cluster()
        self.lab.writes.append(("update_swarm", version, wire(swarm_spec)))
        if version != swarm.version:
            raise api_error(OUT_OF_SEQUENCE)
        swarm.spec = wire(swarm_spec)
        swarm.version = self.lab.next_index()

    @sdk_call
    def get_unlock_key(self):
        swarm = self.cluster()
        return {"UnlockKey": swarm.unlock_key if swarm.spec["EncryptionConfig"]["AutoLockManagers"] else ""}

    @sdk_call
    def unlock_swarm(self, key):
        self.lab.writes.append(("unlock_swarm", self.name, key))
        if self.state != "locked":
            raise api_error("swarm is not locked")
        if key != self.swarm.unlock_key:
            raise api_error("rpc error: code = InvalidArgument desc = invalid key")
        self.state = "active"

    @sdk_call
    def join_swarm(self, remote_addrs, join_token, listen_addr="0.0.0.0:2377", advertise_addr=None, data_path_addr=None):
        self.lab.writes.append(("join_swarm", self.name, list(remote_addrs), join_token))
        if self.join_failures:
            raise self.join_failures.pop(0)
        if self.state != "inactive":
            raise api_error(ALREADY_IN_SWARM)
        swarm = self.lab.swarm_at(remote_addrs)
        role = {token: role for role, token in swarm.tokens.items()}.get(join_token)
        if role is None:
            raise api_error(BAD_TOKEN)
        swarm.add_node(self, role.lower())

    @sdk_call
    def leave_swarm(self, force=False):
        self.lab.writes.append(("leave_swarm", self.name, force))
        if self.state == "inactive":
            raise api_error(NOT_IN_SWARM)
        if self.is_manager and not force:
            raise api_error("You are attempting to leave the swarm on a node that is participating as a manager. Use --force to ignore this message.")
        self.leave()

    @sdk_call
    def nodes(self, filters=None):
        records = self.cluster().nodes.values()
        role = (filters or {}).get("role")
        return [n for n in records if role is None or matches(n["Spec"]["Role"], role)]

    @sdk_call
    def inspect_node(self, node_id):
        return self.cluster().record(node_id)

    @sdk_call
    def update_node(self, node_id, version, node_spec=None):
        swarm = self.cluster()
        record = swarm.record(node_id)
        self.lab.writes.append(("update_node", record["Description"]["Hostname"], wire(node_spec)))
        if version != record["Version"]["Index"]:
            raise api_error(OUT_OF_SEQUENCE)
        swarm.set_node_spec(record, node_spec)

    @sdk_call
    def remove_node(self, node_id, force=False):
        swarm = self.cluster()
        record = swarm.record(node_id)
        self.lab.writes.append(("remove_node", record["Description"]["Hostname"], force))
        if "ManagerStatus" in record:
            raise api_error(f"rpc error: code = FailedPrecondition desc = node {node_id} is a cluster manager; it must be demoted to worker before removal")
        if record["Status"]["State"] != "down" and not force:
            raise api_error(f"rpc error: code = FailedPrecondition desc = node {node_id} is not down and can't be removed")
        del swarm.nodes[node_id]
        swarm.tasks = [t for t in swarm.tasks if t["NodeID"] != node_id]
        swarm.reconcile()

    @sdk_call
    def services(self, filters=None, status=None):
        return list(self.cluster().services.values())

    @sdk_call
    def inspect_service(self, service, insert_defaults=None):
        record = wire(self.cluster().service(service))
        if insert_defaults:
            # The daemon fills in what the service never set, a restart policy for one.
            record["Spec"]["TaskTemplate"].setdefault("RestartPolicy", {"Condition": "any", "Delay": 5000000000, "MaxAttempts": 0})
        return record

    def update_service(self, service, version, *args, **kwargs):
        """The SDK's own update_service builds the request body, which _post_json applies as the daemon does."""
        self.cluster()
        return SDK.update_service(self, service, version, *args, **kwargs)

    def _url(self, path, *args, **kwargs):
        return path.format(*args)

    def _result(self, response, json=False, binary=False):
        return response

    def _post_json(self, url, data=None, params=None, headers=None):
        assert url.startswith("/services/") and url.endswith("/update"), url
        swarm = self.cluster()
        record = swarm.service(url.split("/")[2])
        sent = {k: v for k, v in wire(data).items() if v is not None}
        replicas = sent.get("Mode", {}).get("Replicated", {}).get("Replicas")
        self.lab.writes.append(("update_service", record["Spec"]["Name"], replicas, sent.get("Labels")))
        if params["version"] != record["Version"]["Index"]:
            raise api_error(OUT_OF_SEQUENCE)
        if sent.get("Name") != record["Spec"]["Name"]:
            raise api_error("rpc error: code = Unimplemented desc = renaming services is not supported")
        sent.setdefault("Mode", {"Replicated": {"Replicas": 1}})
        restart = sent.get("TaskTemplate") != record["Spec"]["TaskTemplate"]
        record["Spec"] = sent
        record["Version"]["Index"] = self.lab.next_index()
        if restart:
            swarm.restart(record)
        swarm.reconcile()
        return {"Warnings": None}

    @sdk_call
    def tasks(self, filters=None):
        swarm = self.cluster()
        swarm.start_tasks()
        filters = filters or {}
        found = swarm.tasks
        if "node" in filters:
            found = [t for t in found if matches(t["NodeID"], filters["node"])]
        if "service" in filters:
            found = [t for t in found if matches(t["ServiceID"], filters["service"])]
        if "desired-state" in filters:
            found = [t for t in found if matches(t["DesiredState"], filters["desired-state"])]
        return found

    def visible_networks(self):
        return list(self.swarm.networks.values()) if self.is_manager else []

    def network(self, key):
        for network in self.visible_networks():
            if key in (network["Id"], network["Id"][:12], network["Name"]):
                return network
        raise api_error(f"network {key} not found")

    @sdk_call
    def networks(self, names=None, ids=None, filters=None):
        # Like Docker, the names filter matches parts of names.
        return [n for n in self.visible_networks() if not names or any(name in n["Name"] for name in names)]

    @sdk_call
    def inspect_network(self, net_id, verbose=None, scope=None):
        return self.network(net_id)

    @sdk_call
    def create_network(self, name, driver=None, options=None, ipam=None, attachable=None, labels=None, scope=None, **_):
        swarm = self.cluster()
        self.lab.writes.append(
            ("create_network", name, wire({"driver": driver, "options": options, "attachable": attachable, "scope": scope, "labels": labels}))
        )
        subnet = ipam["Config"][0]["Subnet"] if ipam else f"10.0.{len(swarm.networks) + 1}.0/24"
        network_id = swarm.add_network(name, encrypted=False, attachable=bool(attachable), subnet=subnet)
        swarm.networks[network_id]["Options"].update(options or {})
        swarm.networks[network_id]["Labels"] = dict(labels or {})
        return {"Id": network_id, "Warning": ""}

    @sdk_call
    def remove_network(self, net_id):
        swarm = self.cluster()
        network = self.network(net_id)
        self.lab.writes.append(("remove_network", network["Name"]))
        users = [s["Spec"]["Name"] for s in swarm.services.values() if any(a["Target"] == network["Id"] for a in s["Spec"]["TaskTemplate"]["Networks"])]
        if users:
            raise api_error(f"rpc error: code = FailedPrecondition desc = network {network['Name']} is in use by service {users[0]}")
        del swarm.networks[network["Id"]]

    def close(self):
        self.closed += 1


class Lab:
    """Docker engines by URL, the swarms they form, and the writes they received in order."""

    def __init__(self):
        self.engines = {}
        self.swarms = []
        self.writes = []
        self.ids = itertools.count(1)
        self._index = itertools.count(100)

    def next_index(self):
        return next(self._index)

    def engine(self, name, address=None):
        for engine in self.engines.values():
            if engine.name == name:
                return engine
        engine = Engine(self, name, address or f"192.0.2.{len(self.engines) + 10}")
        self.engines[engine.url] = engine
        return engine

    def url(self, name):
        return self.engine(name).url

    def new_swarm(self, cluster_id, autolock=False):
        swarm = Swarm(self, cluster_id, autolock)
        self.swarms.append(swarm)
        return swarm

    def swarm_at(self, addresses):
        for swarm in self.swarms:
            reachable = {n["ManagerStatus"]["Addr"] for n in swarm.nodes.values() if n.get("ManagerStatus", {}).get("Reachability") == "reachable"}
            if reachable & set(addresses):
                return swarm
        raise api_error(JOIN_TIMEOUT)

    def api_client(self, base_url=None, version=None, timeout=60, **_):
        """Stands in for docker.APIClient(): version='auto' asks the daemon, so an engine that is gone fails here."""
        engine = self.engines.get(base_url)
        if engine is None or not engine.reachable:
            raise DockerException("Error while fetching server API version: ('Connection aborted.', FileNotFoundError(2, 'No such file or directory'))")
        assert version == "auto"
        engine.opened += 1
        return engine

    def all_closed(self):
        return all(engine.opened == engine.closed for engine in self.engines.values())


def standard_lab():
    """Swarm cluster-a: m1 leads and runs no tasks, m2 is a manager that is down, w1..w3 are workers; w4 is in no swarm."""
    lab = Lab()
    swarm = lab.new_swarm("cluster-a")
    swarm.add_node(lab.engine("m1"), "manager", availability="drain")
    swarm.add_node(lab.engine("m2"), "manager", availability="drain")
    for name in ("w1", "w2", "w3"):
        swarm.add_node(lab.engine(name), "worker")
    lab.engine("w4")
    swarm.node_down("m2")
    return lab


class Clock:
    """time for the module code: sleeping only advances the clock, and is recorded."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def install(monkeypatch, lab, *modules):
    """Point the modules' Docker API client at ``lab`` and their clock at a fake one; return the clock."""
    clock = Clock()
    monkeypatch.setattr(_swarm.docker, "APIClient", lab.api_client)
    for module in (_swarm, *modules):
        monkeypatch.setattr(module, "time", clock)
    # Controller code imported by other tests makes module warnings go to the display instead of the result.
    monkeypatch.setattr(module_utils_internal, "is_controller", False)
    return clock


def run_module(capsys, module, check_mode=False, diff=False, **args):
    if check_mode:
        args["_ansible_check_mode"] = True
    if diff:
        args["_ansible_diff"] = True
    capsys.readouterr()
    # A module's warnings and deprecations are process-wide in ansible-core: each run reports only its own.
    for collected in ("_global_warnings", "_global_deprecations"):
        getattr(module_warnings, collected, {}).clear()
    with patch_module_args(args):
        with pytest.raises(SystemExit) as exited:
            module.main()
    result = json.loads(capsys.readouterr().out)
    result["rc"] = exited.value.code
    return result


@pytest.fixture
def lab():
    return standard_lab()


@pytest.fixture
def clock(monkeypatch, lab):
    return install(monkeypatch, lab, swarm_join)


@pytest.fixture
def join(capsys, lab, clock):
    def invoke(node, managers=("m1",), **args):
        return run_module(capsys, swarm_join, docker_host=lab.url(node), managers=[lab.url(m) for m in managers], **args)

    return invoke


def swarm_a(lab):
    return lab.swarms[0]


def ops(lab):
    return [entry[0] for entry in lab.writes]


# state=present


def test_join_as_worker_with_the_managers_token_then_unchanged(lab, join):
    joined = join("w4", vmid=124, pool="swarm_worker", diff=True)
    assert joined["rc"] == 0, joined.get("msg")
    assert joined["changed"] and joined["actions"] == ["joined as worker", "set labels mlfleet.pool, mlfleet.vmid"]
    (_operation, node, addresses, token), update = lab.writes
    assert (node, token) == ("w4", "SWMTKN-1-cluster-a-worker")
    assert addresses == [f"{lab.engine('m1').address}:2377"], "only the reachable manager, not m2 which is down"
    assert update[:2] == ("update_node", "w4")
    record = swarm_a(lab).node("w4")
    assert record["Spec"]["Labels"] == {"mlfleet.vmid": "124", "mlfleet.pool": "swarm_worker"}
    assert (record["Spec"]["Role"], record["Spec"]["Availability"]) == ("worker", "active")
    assert joined["node_id"] == record["ID"] and joined["cluster_id"] == "cluster-a"
    assert joined["diff"]["before"] == {"swarm": "none"}
    assert joined["diff"]["after"]["labels"] == {"mlfleet.pool": "swarm_worker", "mlfleet.vmid": "124"}
    assert lab.engine("w4").opened and lab.all_closed()

    lab.writes.clear()
    again = join("w4", vmid=124, pool="swarm_worker")
    assert again["rc"] == 0 and not again["changed"] and again["actions"] == []
    assert lab.writes == []


def test_check_mode_reports_the_join_and_writes_nothing(lab, join):
    plan = join("w4", vmid=124, check_mode=True, diff=True)
    assert plan["rc"] == 0 and plan["changed"]
    assert lab.writes == []
    assert lab.engine("w4").state == "inactive"
    assert plan["diff"] == {
        "before": {"swarm": "none"},
        "after": {"swarm": "cluster-a", "role": "worker", "availability": "active", "labels": {"mlfleet.vmid": "124"}},
    }


def test_a_member_with_another_role_is_promoted(lab, join):
    promoted = join("w2", role="manager")
    assert promoted["rc"] == 0, promoted.get("msg")
    assert promoted["changed"] and promoted["actions"] == ["promoted to manager"]
    assert ops(lab) == ["update_node"] and lab.writes[0][2]["Role"] == "manager"
    assert swarm_a(lab).node("w2")["ManagerStatus"]["Reachability"] == "reachable"
    assert lab.engine("w2").is_manager and promoted["role"] == "manager"


def test_demoting_the_manager_the_run_works_through_is_refused_before_any_write(lab, join):
    m2 = swarm_a(lab).node("m2")
    m2["Status"]["State"], m2["ManagerStatus"]["Reachability"] = "ready", "reachable"
    lab.engine("m2").reachable = True
    demoted = join("m1", managers=["m1"], role="worker", availability="drain")
    assert demoted["rc"] == 1 and "list another manager" in demoted["msg"]
    assert lab.writes == []


def test_a_node_of_another_swarm_needs_force(lab, join):
    other = lab.new_swarm("cluster-b")
    other.add_node(lab.engine("x1"), "manager")
    other.add_node(lab.engine("w4"), "worker")

    refused = join("w4", node_name="gpu-box-4")
    assert refused["rc"] == 1
    assert "gpu-box-4" in refused["msg"] and "force" in refused["msg"] and "another swarm" in refused["msg"]
    assert lab.writes == []

    forced = join("w4", node_name="gpu-box-4", force=True)
    assert forced["rc"] == 0, forced.get("msg")
    assert ops(lab)[:2] == ["leave_swarm", "join_swarm"] and lab.writes[0] == ("leave_swarm", "w4", True)
    assert forced["actions"][:2] == [f"left its previous swarm (managers {lab.engine('x1').address}:2377)", "joined as worker"]
    assert lab.engine("w4").swarm is swarm_a(lab)


@pytest.mark.parametrize(
    ("join_token", "source"),
    [(None, "the worker token read from unix:///run/fake/m1.sock"), ("SWMTKN-1-rotated", "the join_token given")],
)
def test_a_rejected_join_token_is_not_retried(lab, join, clock, join_token, source):
    if join_token is None:
        lab.engine("w4").join_failures.append(api_error(BAD_TOKEN))
    refused = join("w4", join_token=join_token, retries=4)
    assert refused["rc"] == 1
    assert ops(lab) == ["join_swarm"] and clock.sleeps == []
    assert "refused node unix:///run/fake/w4.sock as worker" in refused["msg"]
    assert f"It did not accept {source}" in refused["msg"]


def test_a_transient_join_error_is_retried_with_doubling_delays(lab, join, clock):
    lab.engine("w4").join_failures.extend([api_error("rpc error: code = Unavailable desc = context deadline exceeded")] * 2)
    joined = join("w4", retries=3, retry_delay=1.5)
    assert joined["rc"] == 0, joined.get("msg")
    assert ops(lab).count("join_swarm") == 3
    assert clock.sleeps == [1.5, 3.0]


def test_a_join_that_keeps_failing_gives_up_after_the_retries(lab, join, clock):
    lab.engine("w4").join_failures.extend([api_error("rpc error: code = Unavailable desc = context deadline exceeded")] * 9)
    failed = join("w4", retries=3, retry_delay=2)
    assert failed["rc"] == 1
    assert ops(lab) == ["join_swarm"] * 4
    assert clock.sleeps == [2.0, 4.0, 8.0]
    assert "after 4 attempts" in failed["msg"] and "context deadline exceeded" in failed["msg"] and "TCP 2377" in failed["msg"]


def test_no_manager_answers(lab, join):
    lab.engine("gone").reachable = False
    locked = lab.engine("m3")
    swarm_a(lab).add_node(locked, "manager")
    locked.state = "locked"
    failed = join("w4", managers=["gone", "m3", "w1"])
    assert failed["rc"] == 1
    reasons = failed["msg"].split("No swarm manager answered. ", 1)[1].split(" | ")
    assert len(reasons) == 3
    assert reasons[0].startswith("Cannot reach the Docker API at unix:///run/fake/gone.sock")
    assert reasons[1].startswith("unix:///run/fake/m3.sock is a locked manager") and "unlock" in reasons[1]
    assert reasons[2].startswith("unix:///run/fake/w1.sock is a worker")
    assert lab.writes == [] and lab.all_closed()


def test_a_locked_manager_is_skipped_for_the_next(lab, join):
    swarm = swarm_a(lab)
    lab.engine("m1").state = "locked"
    swarm.node("m1")["ManagerStatus"]["Reachability"] = "unreachable"
    m2 = swarm.node("m2")
    m2["Status"]["State"], m2["ManagerStatus"]["Reachability"] = "ready", "reachable"
    lab.engine("m2").reachable = True
    joined = join("w4", managers=["m1", "m2"])
    assert joined["rc"] == 0, joined.get("msg")
    assert lab.writes[0][2] == [f"{lab.engine('m2').address}:2377"]
    assert swarm.node("w4")["Spec"]["Role"] == "worker"


def test_present_restores_the_surge_of_an_interrupted_drain(lab, join):
    swarm = swarm_a(lab)
    swarm.add_service("resnet", replicas=6)
    w1 = swarm.node("w1")["ID"]
    swarm.set_spec("w1", Availability="pause")
    swarm.service("resnet")["Spec"].update(Labels={f"mlfleet.drain-surge.{w1}": "2"}, Mode={"Replicated": {"Replicas": 8}})
    swarm.reconcile()

    restored = join("w1")
    assert restored["rc"] == 0, restored.get("msg")
    assert restored["actions"] == ["set availability active", f"restored the replicas of resnet after the drain of node {w1}"]
    service = swarm.service("resnet")
    assert service["Spec"]["Mode"]["Replicated"]["Replicas"] == 6 and service["Spec"]["Labels"] == {}
    assert service["Spec"]["UpdateConfig"] == {"Parallelism": 1, "Order": "start-first"} and swarm.restarts == []
    assert swarm.node("w1")["Spec"]["Availability"] == "active"


# state=absent


def steps(lab):
    """The writes, each reduced to what the drain sequence is about."""
    reduced = []
    for op, subject, *detail in lab.writes:
        if op == "update_node":
            reduced.append((op, subject, detail[0]["Availability"]))
        elif op == "update_service":
            reduced.append((op, subject, *detail))
        else:
            reduced.append((op, subject, detail[-1]))
    return reduced


@pytest.fixture
def busy(lab):
    """w1 runs 2 of the 6 resnet replicas and one task of the global exporter."""
    swarm = swarm_a(lab)
    swarm.add_service("resnet", replicas=6)
    swarm.add_service("exporter")
    assert swarm.tasks_on("w1") == ["exporter", "resnet", "resnet"]
    return swarm


def test_absent_surges_drains_restores_leaves_and_removes(lab, join, busy):
    w1 = busy.node("w1")["ID"]
    spec_before = wire(busy.service("resnet")["Spec"])
    removed = join("w1", state="absent", vmid=121, diff=True)
    assert removed["rc"] == 0, removed.get("msg")
    surge = f"mlfleet.drain-surge.{w1}"
    assert steps(lab) == [
        ("update_node", "w1", "pause"),
        ("update_service", "resnet", 8, {surge: "2"}),
        ("update_node", "w1", "drain"),
        ("update_service", "resnet", 6, {}),
        ("leave_swarm", "w1", False),
        ("remove_node", "w1", True),
    ]
    assert removed["moved_tasks"] == {"resnet": 2, "exporter": 1}
    assert removed["actions"] == ["paused", "surged resnet by 2 replicas", "drained", "left the swarm"]
    assert removed["changed"] and removed["node_id"] is None and removed["diff"]["after"] == {"swarm": "none"}
    assert busy.fewest_running["resnet"] == 6, "the surge kept every replica running while w1 drained"
    assert busy.restarts == [], "the replica updates sent the task template back unchanged"
    assert busy.running(busy.service("resnet")) == 6 and busy.service("resnet")["Spec"] == spec_before
    assert w1 not in busy.nodes and lab.engine("w1").state == "inactive"
    assert lab.all_closed()


def test_absent_without_surge_runs_short_while_draining(lab, join, busy):
    removed = join("w1", state="absent", drain_surge=False)
    assert removed["rc"] == 0, removed.get("msg")
    assert steps(lab) == [("update_node", "w1", "drain"), ("leave_swarm", "w1", False), ("remove_node", "w1", True)]
    assert busy.fewest_running["resnet"] == 4


def test_absent_check_mode_plans_the_drain_and_writes_nothing(lab, join, busy):
    plan = join("w1", state="absent", check_mode=True)
    assert plan["rc"] == 0 and plan["changed"]
    assert plan["actions"] == ["paused", "surged resnet by 2 replicas", "drained", "left the swarm"]
    assert plan["moved_tasks"] == {"resnet": 2, "exporter": 1}
    assert lab.writes == []


def test_an_interrupted_drain_resumes_without_surging_twice(lab, join, busy):
    w1 = busy.node("w1")["ID"]
    surge = f"mlfleet.drain-surge.{w1}"
    busy.set_spec("w1", Availability="pause")
    busy.service("resnet")["Spec"].update(Labels={surge: "2"}, Mode={"Replicated": {"Replicas": 8}})
    busy.reconcile()
    busy.start_tasks()

    resumed = join("w1", state="absent")
    assert resumed["rc"] == 0, resumed.get("msg")
    assert steps(lab) == [
        ("update_node", "w1", "drain"),
        ("update_service", "resnet", 6, {}),
        ("leave_swarm", "w1", False),
        ("remove_node", "w1", True),
    ]
    assert busy.service("resnet")["Spec"]["Mode"]["Replicated"]["Replicas"] == 6
    assert busy.fewest_running["resnet"] == 6 and busy.restarts == []


def test_a_manager_is_demoted_before_it_leaves(lab, join):
    swarm = swarm_a(lab)
    swarm.add_node(lab.engine("m3"), "manager")
    removed = join("m3", state="absent")
    assert removed["rc"] == 0, removed.get("msg")
    assert removed["actions"] == ["demoted to worker", "drained", "left the swarm"]
    assert lab.writes[0][2]["Role"] == "worker"
    assert steps(lab)[1:] == [("update_node", "m3", "drain"), ("leave_swarm", "m3", False), ("remove_node", "m3", True)]


def test_the_manager_the_run_works_through_cannot_be_removed(lab, join):
    refused = join("m1", managers=["m1"], state="absent")
    assert refused["rc"] == 1
    assert "is the manager this run works through" in refused["msg"] and "list another manager first" in refused["msg"]
    assert lab.writes == []


def test_the_refusal_names_the_manager_actually_used(lab, join):
    lab.engine("gone").reachable = False
    refused = join("m1", managers=["gone", "m1"], state="absent")
    assert refused["rc"] == 1
    assert "(unix:///run/fake/m1.sock)" in refused["msg"]


def test_an_unreachable_node_is_found_by_vmid_and_removed(lab, join):
    swarm = swarm_a(lab)
    swarm.set_spec("w3", Labels={"mlfleet.vmid": "123"})
    swarm.node_down("w3")
    removed = join("w3", state="absent", vmid=123)
    assert removed["rc"] == 0, removed.get("msg")
    assert steps(lab) == [("update_node", "w3", "drain"), ("remove_node", "w3", True)]
    assert removed["actions"] == ["drained", "removed while unreachable"]


def test_an_unreachable_node_without_vmid_or_name_fails(lab, join):
    lab.engine("w3").reachable = False
    failed = join("w3", state="absent")
    assert failed["rc"] == 1
    assert "unix:///run/fake/w3.sock" in failed["msg"] and "give its vmid or node_name" in failed["msg"]


def test_an_unreachable_node_that_ran_tasks_is_removed(lab, join):
    swarm = swarm_a(lab)
    swarm.set_spec("w3", Labels={"mlfleet.vmid": "123"})
    swarm.add_service("resnet", replicas=6)
    swarm.node_down("w3")
    assert swarm.tasks_on("w3") == ["resnet", "resnet"], "desired shutdown, last reported running"
    removed = join("w3", state="absent", vmid=123, drain_timeout=5)
    assert removed["rc"] == 0, removed.get("msg")
    assert steps(lab)[-1] == ("remove_node", "w3", True)


def test_a_node_that_left_but_was_not_removed_is_removed(lab, join):
    swarm = swarm_a(lab)
    swarm.set_spec("w1", Availability="drain", Labels={"mlfleet.vmid": "121"})
    lab.engine("w1").leave()
    removed = join("w1", state="absent", vmid=121)
    assert removed["rc"] == 0, removed.get("msg")
    assert steps(lab)[-1] == ("remove_node", "w1", True)
    assert "leave_swarm" not in ops(lab)


def test_absent_on_a_node_in_no_swarm_is_unchanged(lab, join):
    result = join("w4", state="absent", diff=True)
    assert result["rc"] == 0, result.get("msg")
    assert not result["changed"] and result["actions"] == [] and result["node_id"] is None
    assert result["diff"] == {"before": {"swarm": "none"}, "after": {"swarm": "none"}}
    assert lab.writes == []
