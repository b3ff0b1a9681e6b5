"""swarm_service's main() in-process against the in-memory swarm of test_swarm_join.

The fake engine is extended with the service, config and secret calls. It stores a service spec as the
daemon does: Go's omitempty drops fields that are zero, false, empty or null, and network targets are
stored as network IDs, so the idempotency checks run against what a real daemon hands back.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from ansible.module_utils.testing import patch_module_args
from test_swarm_join import SDK, Engine, Lab, api_error, install, sdk_call, wire

from ansible_collections.mlfleet.serving.plugins.modules import swarm_service

IMAGE = "registry.example/echo:1"
# Map-typed fields: their entries stay even when empty (only the whole map is omitted when empty).
MAPS = {"Labels", "Options", "DriverOpts"}
SECRET = "s3cr3t-hf-token-value"


def empty(value):
    return value is None or value is False or value == "" or value == [] or value == {} or (type(value) in (int, float) and value == 0)


def omitempty(value, key=None):
    """A spec as the daemon stores and returns it."""
    if isinstance(value, list):
        return [omitempty(v) for v in value]
    if not isinstance(value, dict):
        return value
    kept = {}
    for k, v in value.items():
        v = omitempty(v, k)
        # A map keeps its entries; Mode.Global is a pointer to an empty struct, which Go keeps as {}.
        if key in MAPS or k == "Global" or not empty(v):
            kept[k] = v
    return kept


class ServiceEngine(Engine):
    """The engine of test_swarm_join with services, configs and secrets."""

    def create_service(self, *args, **kwargs):
        """The SDK's own create_service builds the request body (and checks the arguments)."""
        self.cluster()
        return SDK.create_service(self, *args, **kwargs)

    def stored(self, data):
        spec = {k: v for k, v in wire(data).items() if v is not None}
        for attachment in (spec.get("TaskTemplate") or {}).get("Networks") or []:
            attachment["Target"] = self.network(attachment["Target"])["Id"]
        return omitempty(spec)

    def _post_json(self, url, data=None, params=None, headers=None):
        swarm = self.cluster()
        if url == "/services/create":
            self.lab.writes.append(("create_service", data["Name"], wire(data)))
            if any(s["Spec"]["Name"] == data["Name"] for s in swarm.services.values()):
                raise api_error(f"rpc error: code = AlreadyExists desc = name conflicts with an existing object: service {data['Name']}")
            service = {"ID": f"svc-{data['Name']}-{next(self.lab.ids)}", "Version": {"Index": self.lab.next_index()}, "Spec": self.stored(data)}
            swarm.services[service["ID"]] = service
            swarm.reconcile()
            return {"ID": service["ID"], "Warnings": None}
        assert url.startswith("/services/") and url.endswith("/update"), url
        record = swarm.service(url.split("/")[2])
        self.lab.writes.append(("update_service", record["Spec"]["Name"], wire(data)))
        if params["version"] != record["Version"]["Index"]:
            raise api_error("rpc error: code = Unknown desc = update out of sequence")
        spec = self.stored(data)
        restart = spec.get("TaskTemplate") != record["Spec"].get("TaskTemplate")
        record["Spec"] = spec
        record["Version"]["Index"] = self.lab.next_index()
        if restart:
            swarm.restart(record)
        swarm.reconcile()
        return {"Warnings": None}

    @sdk_call
    def remove_service(self, service):
        swarm = self.cluster()
        record = swarm.service(service)
        self.lab.writes.append(("remove_service", record["Spec"]["Name"]))
        del swarm.services[record["ID"]]
        for task in swarm.tasks:
            if task["ServiceID"] == record["ID"]:
                swarm.stop(task)
        return True

    # Configs and secrets.

    def listing(self, kind, filters):
        self.cluster()
        found = list(self.lab.objects[kind].values())
        filters = filters or {}
        if "name" in filters:
            found = [o for o in found if filters["name"] in o["Spec"]["Name"]]
        if "label" in filters:
            key, _separator, value = filters["label"].partition("=")
            found = [o for o in found if key in o["Spec"]["Labels"] and (not value or o["Spec"]["Labels"][key] == value)]
        # The API never returns a secret's data.
        return [{k: v for k, v in o.items() if k != "Data"} if kind == "secret" else o for o in found]

    def create_object(self, kind, name, data, labels):
        self.cluster()
        self.lab.writes.append((f"create_{kind}", name, dict(labels or {})))
        if any(o["Spec"]["Name"] == name for o in self.lab.objects[kind].values()):
            raise api_error(f"rpc error: code = AlreadyExists desc = {kind} {name} already exists")
        object_id = f"{kind}-{next(self.lab.ids)}"
        self.lab.objects[kind][object_id] = {
            "ID": object_id,
            "Version": {"Index": self.lab.next_index()},
            "Spec": {"Name": name, "Labels": dict(labels or {})},
            "Data": data.decode(),
        }
        return {"ID": object_id}

    def remove_object(self, kind, object_id):
        swarm = self.cluster()
        obj = self.lab.objects[kind].get(object_id)
        if obj is None:
            raise api_error(f"{kind} {object_id} not found")
        self.lab.writes.append((f"remove_{kind}", obj["Spec"]["Name"]))
        field = f"{kind.capitalize()}ID"
        users = [s["Spec"]["Name"] for s in swarm.services.values() if any(r[field] == object_id for r in container_spec(s).get(f"{kind.capitalize()}s", []))]
        if users:
            raise api_error(f"rpc error: code = InvalidArgument desc = {kind} '{obj['Spec']['Name']}' is in use by the following service: {users[0]}")
        del self.lab.objects[kind][object_id]

    @sdk_call
    def configs(self, filters=None):
        return self.listing("config", filters)

    @sdk_call
    def secrets(self, filters=None):
        return self.listing("secret", filters)

    @sdk_call
    def create_config(self, name, data, labels=None, templating=None):
        return self.create_object("config", name, data, labels)

    @sdk_call
    def create_secret(self, name, data, labels=None, driver=None):
        return self.create_object("secret", name, data, labels)

    @sdk_call
    def remove_config(self, id):  # noqa: A002 - the SDK's parameter name
        self.remove_object("config", id)

    @sdk_call
    def remove_secret(self, id):  # noqa: A002 - the SDK's parameter name
        self.remove_object("secret", id)


class ServiceLab(Lab):
    def __init__(self):
        super().__init__()
        self.objects = {"config": {}, "secret": {}}

    def engine(self, name, address=None):
        for engine in self.engines.values():
            if engine.name == name:
                return engine
        engine = ServiceEngine(self, name, address or f"192.0.2.{len(self.engines) + 10}")
        self.engines[engine.url] = engine
        return engine

    def names(self, kind):
        return sorted(o["Spec"]["Name"] for o in self.objects[kind].values())


def container_spec(service):
    return service["Spec"]["TaskTemplate"]["ContainerSpec"]


def ops(lab):
    return [entry[0] for entry in lab.writes]


@pytest.fixture
def lab(monkeypatch):
    lab = ServiceLab()
    swarm = lab.new_swarm("cluster-s")
    swarm.add_node(lab.engine("m1"), "manager", availability="drain")
    for name in ("w1", "w2"):
        swarm.add_node(lab.engine(name), "worker")
    lab.network_id = swarm.add_network("mlfleet", encrypted=True)
    install(monkeypatch, lab, swarm_service)
    return lab


@pytest.fixture
def swarm(lab):
    return lab.swarms[0]


@pytest.fixture
def service(capsys, lab):
    def invoke(check_mode=False, diff=False, **args):
        args = {"docker_host": lab.url("m1"), "name": "echo", "image": IMAGE, "wait": False, "networks": ["mlfleet"], **args}
        if check_mode:
            args["_ansible_check_mode"] = True
        if diff:
            args["_ansible_diff"] = True
        capsys.readouterr()
        with patch_module_args(args):
            with pytest.raises(SystemExit) as exited:
                swarm_service.main()
        out = capsys.readouterr().out
        result = json.loads(out)
        result["rc"], result["stdout"] = exited.value.code, out
        return result

    return invoke


# Arguments whose stored form loses zero, false and empty fields.
FULL = dict(
    replicas=2,
    env={"MODEL": "resnet", "WORKERS": "4"},
    labels={},
    container_labels={},
    mounts=[{"type": "bind", "source": "/srv/models", "target": "/models", "read_only": False}],
    ports=[{"published": 8080, "target": 80}],
    max_replicas_per_node=0,
    constraints=["node.role==worker"],
    spread=[],
    limit_cpus=0.5,
    limit_memory="256M",
    healthcheck={"test": ["CMD", "true"], "interval": "10s"},
    update_config={"order": "start-first", "failure_action": "rollback"},
    init=False,
)


def test_create_then_a_rerun_against_the_stored_spec_is_unchanged(lab, swarm, service):
    created = service(**FULL)
    assert created["rc"] == 0, created.get("msg")
    assert created["changed"] and created["actions"] == ["created service echo"]
    [(op, name, sent)] = lab.writes
    assert (op, name) == ("create_service", "echo")
    assert sent["TaskTemplate"]["Networks"] == [{"Target": lab.network_id}]
    stored = swarm.service("echo")
    assert created["service_id"] == stored["ID"] and created["replicas"] == 2
    # The fake stores as the daemon does: the zero and empty fields are gone.
    assert "MaxReplicas" not in stored["Spec"]["TaskTemplate"]["Placement"]
    assert "ForceUpdate" not in stored["Spec"]["TaskTemplate"]
    assert "ReadOnly" not in container_spec(stored)["Mounts"][0]
    assert "Labels" not in stored["Spec"] and "Labels" not in container_spec(stored)

    lab.writes.clear()
    again = service(**FULL)
    assert again["rc"] == 0, again.get("msg")
    assert not again["changed"] and again["actions"] == []
    assert lab.writes == []
    assert again["service_id"] == stored["ID"]


def test_a_changed_env_value_updates_with_the_stored_force_update(lab, swarm, service):
    assert service(**FULL)["rc"] == 0
    swarm.service("echo")["Spec"]["TaskTemplate"]["ForceUpdate"] = 3
    lab.writes.clear()

    updated = service(diff=True, **{**FULL, "env": {"MODEL": "resnet", "WORKERS": "8"}})
    assert updated["rc"] == 0, updated.get("msg")
    assert updated["actions"] == ["updated service echo (TaskTemplate.ContainerSpec.Env)"]
    [(op, name, sent)] = lab.writes
    assert (op, name) == ("update_service", "echo")
    assert sent["TaskTemplate"]["ForceUpdate"] == 3
    assert sent["TaskTemplate"]["ContainerSpec"]["Env"] == ["MODEL=resnet", "WORKERS=8"]
    assert updated["diff"]["before"]["TaskTemplate"]["ContainerSpec"]["Env"] == ["MODEL=resnet", "WORKERS=4"]
    assert updated["diff"]["after"]["TaskTemplate"]["ContainerSpec"]["Env"] == ["MODEL=resnet", "WORKERS=8"]
    assert swarm.service("echo")["Spec"]["TaskTemplate"]["ForceUpdate"] == 3

    lab.writes.clear()
    again = service(**{**FULL, "env": {"MODEL": "resnet", "WORKERS": "8"}})
    assert not again["changed"] and lab.writes == []


def test_keep_replicas_leaves_an_autoscaled_count(lab, swarm, service):
    assert service(replicas=5)["rc"] == 0
    lab.writes.clear()

    kept = service(replicas=2, keep_replicas=True)
    assert kept["rc"] == 0, kept.get("msg")
    assert not kept["changed"] and lab.writes == [] and kept["replicas"] == 5

    scaled = service(replicas=2, keep_replicas=False)
    assert scaled["rc"] == 0, scaled.get("msg")
    assert scaled["actions"] == ["updated service echo (Mode.Replicated.Replicas)"]
    [(op, _name, sent)] = lab.writes
    assert op == "update_service" and sent["Mode"] == {"Replicated": {"Replicas": 2}}
    assert swarm.service("echo")["Spec"]["Mode"] == {"Replicated": {"Replicas": 2}}


def config_name(content):
    return f"echo_etc_echo.conf_{hashlib.sha256(content.encode()).hexdigest()[:12]}"


def test_a_config_is_named_by_its_content_reused_and_replaced(lab, swarm, service):
    old, new = "greeting = hello\n", "greeting = bonjour\n"
    created = service(configs=[{"target": "/etc/echo.conf", "content": old}])
    assert created["rc"] == 0, created.get("msg")
    assert ops(lab) == ["create_config", "create_service"]
    assert lab.writes[0][1] == config_name(old)
    assert lab.writes[0][2] == {"mlfleet.service": "echo", "mlfleet.target": "/etc/echo.conf"}
    [reference] = container_spec(swarm.service("echo"))["Configs"]
    assert reference["ConfigName"] == config_name(old) and reference["File"]["Name"] == "/etc/echo.conf" and reference["File"]["Mode"] == 0o444
    assert reference["ConfigID"] in lab.objects["config"]

    lab.writes.clear()
    again = service(configs=[{"target": "/etc/echo.conf", "content": old}])
    assert not again["changed"] and lab.writes == []

    changed = service(configs=[{"target": "/etc/echo.conf", "content": new}])
    assert changed["rc"] == 0, changed.get("msg")
    assert [tuple(write[:2]) for write in lab.writes] == [
        ("create_config", config_name(new)),
        ("update_service", "echo"),
        ("remove_config", config_name(old)),
    ]
    assert changed["actions"] == [
        f"created config {config_name(new)}",
        "updated service echo (TaskTemplate.ContainerSpec.Configs)",
        f"removed unused config {config_name(old)}",
    ]
    assert lab.names("config") == [config_name(new)]
    assert container_spec(swarm.service("echo"))["Configs"][0]["ConfigName"] == config_name(new)


def test_a_secret_has_a_random_name_a_slow_digest_and_never_shows(lab, swarm, service):
    secrets = [{"target": "hf_token", "content": SECRET}]
    created = service(diff=True, secrets=secrets)
    assert created["rc"] == 0, created.get("msg")
    assert ops(lab) == ["create_secret", "create_service"]
    _op, name, labels = lab.writes[0]
    assert re.fullmatch(r"echo_hf_token_[0-9a-f]{12}", name)
    assert labels["mlfleet.service"] == "echo" and labels["mlfleet.target"] == "hf_token"
    assert labels["mlfleet.content-digest"].startswith("pbkdf2-sha256:200000:")
    assert SECRET not in labels["mlfleet.content-digest"]
    assert SECRET not in created["stdout"]
    [reference] = container_spec(swarm.service("echo"))["Secrets"]
    assert reference["SecretName"] == name and reference["File"]["Mode"] == 0o400

    lab.writes.clear()
    again = service(diff=True, secrets=secrets)
    assert again["rc"] == 0, again.get("msg")
    assert not again["changed"] and lab.writes == []
    assert SECRET not in again["stdout"]
    assert lab.names("secret") == [name]

    rotated = service(diff=True, secrets=[{"target": "hf_token", "content": SECRET + "-2"}])
    assert rotated["rc"] == 0, rotated.get("msg")
    assert ops(lab) == ["create_secret", "update_service", "remove_secret"]
    assert lab.names("secret") != [name] and len(lab.names("secret")) == 1
    assert SECRET not in rotated["stdout"]


def test_absent_removes_the_service_and_its_objects_then_is_unchanged(lab, swarm, service):
    args = dict(configs=[{"target": "/etc/echo.conf", "content": "x = 1\n"}], secrets=[{"target": "hf_token", "content": SECRET}])
    assert service(**args)["rc"] == 0
    lab.writes.clear()

    removed = service(state="absent", diff=True)
    assert removed["rc"] == 0, removed.get("msg")
    assert removed["changed"] and removed["service_id"] is None
    assert [tuple(write[:2]) for write in lab.writes] == [
        ("remove_service", "echo"),
        ("remove_config", config_name("x = 1\n")),
        ("remove_secret", lab.writes[2][1]),
    ]
    assert swarm.services == {} and lab.objects == {"config": {}, "secret": {}}
    assert removed["diff"] == {"before": {"exists": True}, "after": {"exists": False}}

    lab.writes.clear()
    again = service(state="absent")
    assert again["rc"] == 0, again.get("msg")
    assert not again["changed"] and again["actions"] == [] and lab.writes == []


def test_check_mode_reports_and_writes_nothing(lab, swarm, service):
    args = dict(configs=[{"target": "/etc/echo.conf", "content": "x = 1\n"}], secrets=[{"target": "hf_token", "content": SECRET}])
    plan = service(check_mode=True, diff=True, **args)
    assert plan["rc"] == 0, plan.get("msg")
    assert plan["changed"] and "created service echo" in plan["actions"]
    assert lab.writes == [] and swarm.services == {} and lab.objects == {"config": {}, "secret": {}}
    assert SECRET not in plan["stdout"]

    assert service(**args)["rc"] == 0
    lab.writes.clear()
    for changes in (dict(env={"A": "1"}), dict(configs=[{"target": "/etc/echo.conf", "content": "x = 2\n"}]), dict(state="absent")):
        plan = service(check_mode=True, **{**args, **changes})
        assert plan["rc"] == 0, plan.get("msg")
        assert plan["changed"], changes
        assert lab.writes == [], changes


@pytest.mark.parametrize(
    ("bad", "option"),
    [
        (dict(stop_grace_period="10x"), "stop_grace_period"),
        (dict(healthcheck={"test": ["CMD", "true"], "interval": "10x"}), "healthcheck.interval"),
        (dict(update_config={"delay": "10x"}), "update_config.delay"),
        (dict(limit_memory="lots"), "limit_memory"),
        (dict(reserve_memory="lots"), "reserve_memory"),
        (dict(stop_signal="usr1"), "stop_signal"),
    ],
)
def test_a_bad_duration_size_or_signal_fails_naming_the_option(lab, service, bad, option):
    failed = service(**bad)
    assert failed["rc"] == 1
    assert f"{option}=" in failed["msg"]
    assert lab.writes == []


def test_a_bad_option_fails_before_any_object_is_created(lab, service):
    failed = service(stop_grace_period="10x", configs=[{"target": "/etc/echo.conf", "content": "x = 1\n"}])
    assert failed["rc"] == 1 and "stop_grace_period" in failed["msg"]
    assert lab.writes == []


@pytest.mark.parametrize("network", ["nope", "mlf"])
def test_a_missing_network_fails_naming_it(lab, service, network):
    failed = service(networks=[network])
    assert failed["rc"] == 1
    assert f"network {network} does not exist" in failed["msg"]
    assert lab.writes == []


def test_a_stop_signal_is_sent_and_kept(lab, swarm, service):
    created = service(stop_signal="SIGUSR1")
    assert created["rc"] == 0, created.get("msg")
    assert container_spec(swarm.service("echo"))["StopSignal"] == "SIGUSR1"
    lab.writes.clear()
    assert not service(stop_signal="SIGUSR1")["changed"] and lab.writes == []
    changed = service(stop_signal="SIGTERM")
    assert changed["actions"] == ["updated service echo (TaskTemplate.ContainerSpec.StopSignal)"]


@pytest.mark.parametrize(
    ("service", "target", "expected"),
    [
        # Short enough: the service, the last 40 characters of the path and the suffix, as always.
        ("resnet18", "/home/model-server/config.properties", "resnet18_home_model-server_config.properties_7fae5a198bae"),
        # A standby service's name is longer: less of the path, within Swarm's 64 characters.
        ("resnet18-standby", "/home/model-server/config.properties", "resnet18-standby_ome_model-server_config.properties_7fae5a198bae"),
        ("densenet161-standby", "/home/model-server/config.properties", "densenet161-standby__model-server_config.properties_7fae5a198bae"),
    ],
)
def test_config_and_secret_names_fit_swarms_limit(service, target, expected):
    from ansible_collections.mlfleet.serving.plugins.modules.swarm_service import object_name

    name = object_name(service, target, "7fae5a198bae")
    assert name == expected and len(name) <= 64
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}[a-zA-Z0-9]", name)


def test_a_service_name_too_long_for_its_configs_is_named():
    from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import SwarmError
    from ansible_collections.mlfleet.serving.plugins.modules.swarm_service import object_name

    with pytest.raises(SwarmError, match="the service name 'a{50}' is too long to name its configs"):
        object_name("a" * 50, "/etc/x.conf", "7fae5a198bae")


def describe(swarm, hostname, version, gpus=()):
    """What a node's daemon reports: its engine version and the GPUs it advertises (node-generic-resources)."""
    swarm.node(hostname)["Description"] |= {
        "Engine": {"EngineVersion": version},
        "Resources": {"GenericResources": [{"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": gpu}} for gpu in gpus]},
    }


def test_a_gpu_service_reserves_its_units_and_a_rerun_is_unchanged(lab, swarm, service):
    describe(swarm, "m1", "26.1.5+dfsg1")
    describe(swarm, "w1", "26.1.5+dfsg1", gpus=["GPU-0", "GPU-1"])
    describe(swarm, "w2", "20.10.24+dfsg1")  # no GPU: its engine version does not matter
    created = service(reserve_generic_resources={"NVIDIA-GPU": 1})
    assert created["rc"] == 0, created.get("msg")
    reservations = swarm.service("echo")["Spec"]["TaskTemplate"]["Resources"]["Reservations"]
    assert reservations == {"GenericResources": [{"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 1}}]}
    lab.writes.clear()
    again = service(reserve_generic_resources={"NVIDIA-GPU": 1})
    assert again["rc"] == 0 and not again["changed"] and lab.writes == []
    changed = service(reserve_generic_resources={"NVIDIA-GPU": 2})
    assert changed["changed"] and "TaskTemplate" in changed["actions"][0]


@pytest.mark.parametrize(
    ("versions", "gpus", "reserve", "message"),
    [
        (
            {"m1": "20.10.24+dfsg1", "w1": "26.1.5"},
            ["GPU-0"],
            {"NVIDIA-GPU": 1},
            r"Docker Engine before 23\.0\.2 refuses together with networks \(moby#44378\); "
            r"these nodes run an older engine: m1 \(manager, 20\.10\.24\+dfsg1\)\. "
            r"Upgrade them: on Debian 12, Docker's own packages \(docker_engine_source: docker\)",
        ),
        ({"m1": "26.1.5", "w1": "23.0.1"}, ["GPU-0"], {"NVIDIA-GPU": 1}, r"older engine: w1 \(worker, 23\.0\.1\)"),
        ({"m1": "26.1.5", "w1": ""}, ["GPU-0"], {"NVIDIA-GPU": 1}, r"older engine: w1 \(worker, version unknown\)"),
        (
            {"m1": "26.1.5", "w1": "26.1.5"},
            [],
            {"NVIDIA-GPU": 1},
            r"reserves generic resources NVIDIA-GPU, which no node of the swarm advertises: set node-generic-resources on the GPU nodes",
        ),
        (
            {"m1": "26.1.5", "w1": "26.1.5"},
            ["GPU-0"],
            {"NVIDIA-GPU": 0},
            r"reserve_generic_resources\.NVIDIA-GPU must be a whole number of units, 1 or more, not 0",
        ),
        ({"m1": "26.1.5", "w1": "26.1.5"}, ["GPU-0"], {"NVIDIA-GPU": "1.5"}, r"must be a whole number of units"),
        ({"m1": "26.1.5", "w1": "26.1.5"}, ["GPU-0"], {"NVIDIA GPU": 1}, r"'NVIDIA GPU' is not a resource kind; name it like NVIDIA-GPU"),
    ],
)
def test_a_gpu_service_the_swarm_cannot_run_fails_before_any_write(lab, swarm, service, versions, gpus, reserve, message):
    for hostname, version in versions.items():
        describe(swarm, hostname, version, gpus=gpus if hostname == "w1" else ())
    failed = service(reserve_generic_resources=reserve)
    assert failed["rc"] == 1 and re.search(message, failed["msg"]), failed["msg"]
    assert lab.writes == []
