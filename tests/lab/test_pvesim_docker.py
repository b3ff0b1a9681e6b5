"""The Proxmox simulator's docker backend on real Docker: a VM's config becomes a lab node that
Ansible can log in to, with the address, limits and identity the config asks for; and a Proxmox
client drives such a VM from clone to SSH and back through the simulator's HTTPS API.

Runs against a lab of its own with no nodes of lab up's: every node here is a simulated VM.
"""

import asyncio
import copy
import os
import re
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lab_support import REPO_ROOT, run
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException

from lab.pvesim.backend import BackendError
from lab.pvesim.config import DEFAULT_CONFIG
from lab.pvesim.docker_backend import DockerBackend
from lab.pvesim.server import Simulator, running_in_thread

LAB_ENV = {
    "MLFLEET_LAB_NAME": "mlfleet-simtest",
    "MLFLEET_LAB_SUBNET": "192.168.215.0/24",
    "MLFLEET_LAB_GATEWAY": "192.168.215.1",
    "MLFLEET_LAB_NODES": "0",
    "MLFLEET_LAB_PVE_PORT": "18007",
}


@dataclass
class VM:
    vmid: int
    config: dict = field(default_factory=dict)
    node: str = "pve1"


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root; run them through ./scripts/test as root")
    work = tmp_path_factory.mktemp("simlab")
    env = {**LAB_ENV, "MLFLEET_LAB_STATE": str(work / "state"), "MLFLEET_LAB_INVENTORY": str(work / "inventory.yml")}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        run([REPO_ROOT / "lab" / "up.sh"], env=env, timeout=900)
        key = work / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
        yield {"work": work, "key": key, "env": env}
    finally:
        run([REPO_ROOT / "lab" / "down.sh"], env=env, check=False)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def backend(lab_env):
    return asyncio.run(DockerBackend.from_lab_settings())


def wait_for_agent(backend, vm, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        interfaces = asyncio.run(backend.guest_interfaces(vm))
        if interfaces:
            return {i["name"]: i for i in interfaces}
        time.sleep(0.5)
    raise AssertionError(f"the agent of VM {vm.vmid} did not answer within {timeout}s")


def inspect(backend, vmid):
    return run(["docker", "inspect", "-f", "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.State.Running}}", backend.container(vmid)]).stdout.split()


def ssh(lab_env, user, address, command):
    return subprocess.run(
        ["ssh", "-i", str(lab_env["key"]), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"{user}@{address}", command],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_vm_lifecycle_with_static_address_and_cloud_init_user(backend, lab_env):
    public_key = Path(f"{lab_env['key']}.pub").read_text().strip()
    vm = VM(
        901,
        {
            "name": "web-1",
            "cores": 1,
            "memory": 512,
            "net0": "virtio=BC:24:11:AA:BB:01,bridge=vmbr0",
            "ipconfig0": "ip=192.168.215.50/24,gw=192.168.215.1",
            "ciuser": "mlops",
            "sshkeys": urllib.parse.quote(public_key + "\n", safe=""),
        },
    )
    assert asyncio.run(backend.guest_interfaces(vm)) is None
    asyncio.run(backend.start(vm))
    interfaces = wait_for_agent(backend, vm)
    assert interfaces["eth0"]["hardware-address"] == "bc:24:11:aa:bb:01"
    assert {"ip-address-type": "ipv4", "ip-address": "192.168.215.50", "prefix": 24} in interfaces["eth0"]["ip-addresses"]
    assert "docker0" in interfaces  # the agent sees every guest interface, the node's own bridges too
    assert inspect(backend, 901) == [str(10**9), str(512 * 2**20), "true"]

    logged_in = ssh(lab_env, "mlops", "192.168.215.50", "hostname && sudo -n docker info --format '{{.ServerVersion}}'")
    assert logged_in.returncode == 0, logged_in.stderr
    assert logged_in.stdout.split()[0] == "web-1"

    asyncio.run(backend.stop(vm))
    assert inspect(backend, 901)[2] == "false"
    assert asyncio.run(backend.guest_interfaces(vm)) is None

    # A changed config applies at the next start, as on Proxmox.
    vm.config.update(cores=2, memory=768, ipconfig0="ip=192.168.215.51/24,gw=192.168.215.1")
    asyncio.run(backend.start(vm))
    interfaces = wait_for_agent(backend, vm)
    assert [a["ip-address"] for a in interfaces["eth0"]["ip-addresses"] if a["ip-address-type"] == "ipv4"] == ["192.168.215.51"]
    assert inspect(backend, 901) == [str(2 * 10**9), str(768 * 2**20), "true"]

    asyncio.run(backend.stop(vm))
    asyncio.run(backend.destroy(vm))
    assert run(["docker", "inspect", backend.container(901)], check=False).returncode != 0
    assert not (Path(lab_env["env"]["MLFLEET_LAB_STATE"]) / "nodes" / backend.container(901)).exists()


def test_dhcp_vm_gets_an_address_of_the_lab_network(backend):
    vm = VM(902, {"name": "web-2", "cores": 1, "memory": 256, "ipconfig0": "ip=dhcp"})
    asyncio.run(backend.start(vm))
    try:
        (address,) = [a["ip-address"] for a in wait_for_agent(backend, vm)["eth0"]["ip-addresses"] if a["ip-address-type"] == "ipv4"]
        assert address.startswith("192.168.215.")
        assert address != "192.168.215.1"
    finally:
        asyncio.run(backend.stop(vm))
        asyncio.run(backend.destroy(vm))


def test_static_address_outside_the_lab_network_is_refused_with_the_fix(backend):
    vm = VM(903, {"name": "web-3", "ipconfig0": "ip=10.20.30.40/24,gw=10.20.30.1"})
    with pytest.raises(BackendError, match=r"VM 903: ipconfig0 address 10\.20\.30\.40 is not a host address of the lab network .*ip=dhcp"):
        asyncio.run(backend.start(vm))
    assert run(["docker", "inspect", backend.container(903)], check=False).returncode != 0


def test_a_container_left_by_another_lab_instance_is_not_taken_for_the_vm(backend, lab_env, tmp_path):
    """A host that keeps Docker's data between runs may hold a node container of the same name from a
    lab whose state is gone; starting the VM must not boot that stale disk with its stale keys."""
    state = Path(lab_env["env"]["MLFLEET_LAB_STATE"])
    stale_state = tmp_path / "stale-state"
    (stale_state / "registry" / "tls").mkdir(parents=True)
    (stale_state / "registry" / "tls" / "ca.crt").write_bytes((state / "registry" / "tls" / "ca.crt").read_bytes())
    name = backend.container(904)
    run(["bash", "-c", f'. lab/lib.sh && lab_start_node {name} stale 1 256m ""'], env={**lab_env["env"], "MLFLEET_LAB_STATE": str(stale_state)})
    stale_id = run(["docker", "inspect", "-f", "{{.Id}}", name]).stdout.strip()
    vm = VM(904, {"name": "web-4", "cores": 1, "memory": 256, "ipconfig0": "ip=dhcp"})
    try:
        asyncio.run(backend.start(vm))
        wait_for_agent(backend, vm)
        labels = run(["docker", "inspect", "-f", '{{.Id}} {{index .Config.Labels "io.mlfleet.lab.instance"}}', name]).stdout.split()
        assert labels[0] != stale_id
        assert labels[1] == (state / "instance-id").read_text().strip()
        assert run(["docker", "exec", name, "hostname"]).stdout.strip() == "web-4"
    finally:
        asyncio.run(backend.stop(vm))
        asyncio.run(backend.destroy(vm))


def wait_for_task(api, upid, timeout=60):
    node = upid.split(":")[1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = api.nodes(node).tasks(upid).status.get()
        if status["status"] == "stopped":
            return status
        time.sleep(0.2)
    raise AssertionError(f"task {upid} still running after {timeout}s")


@pytest.mark.parametrize("auth", ["token", "ticket"])
def test_proxmoxer_drives_a_docker_backed_vm_from_clone_to_ssh_and_back(backend, lab_env, tmp_path, auth):
    simulator = Simulator(copy.deepcopy(DEFAULT_CONFIG), tmp_path / "sim", backend=backend)
    root = DEFAULT_CONFIG["users"]["root@pam"]
    credentials = {"token_name": "admin", "token_value": root["tokens"]["admin"]["secret"]} if auth == "token" else {"password": root["password"]}
    public_key = Path(f"{lab_env['key']}.pub").read_text().strip()
    with running_in_thread(simulator) as url:
        api = ProxmoxAPI(
            "127.0.0.1", port=urllib.parse.urlsplit(url).port, user="root@pam", verify_ssl=str(simulator.certificates.ca_file), timeout=30,
            **credentials,
        )  # fmt: skip
        template = next(vm for vm in api.cluster.resources.get(type="vm") if vm["template"])
        vmid = int(api.cluster.nextid.get())
        upid = api.nodes(template["node"]).qemu(template["vmid"]).clone.post(newid=vmid, name="sim-worker-1", full=1)
        assert wait_for_task(api, upid)["exitstatus"] == "OK"
        vm_api = api.nodes(template["node"]).qemu(vmid)
        vm_api.config.put(
            cores=1, memory=512, ipconfig0="ip=192.168.215.70/24,gw=192.168.215.1", ciuser="mlops",
            sshkeys=urllib.parse.quote(public_key, safe=""), tags="mlfleet;worker",
        )  # fmt: skip
        assert wait_for_task(api, vm_api.status.start.post())["exitstatus"] == "OK"

        refusals, deadline = 0, time.monotonic() + 120
        while True:
            try:
                interfaces = vm_api.agent("network-get-interfaces").get()["result"]
                break
            except ResourceException as error:
                assert error.status_code == 500, error
                refusals += 1
                assert time.monotonic() < deadline, "the guest agent of the docker-backed VM never answered"
                time.sleep(0.5)
        assert refusals >= 1, "the agent answered before the node could have booted"
        eth0 = next(i for i in interfaces if i["name"] == "eth0")
        assert "192.168.215.70" in [a["ip-address"] for a in eth0["ip-addresses"]]
        net0_mac = re.search(r"=([0-9A-Fa-f:]{17})", vm_api.config.get()["net0"]).group(1)
        assert eth0["hardware-address"] == net0_mac.lower()

        logged_in = ssh(lab_env, "mlops", "192.168.215.70", "hostname")
        assert logged_in.returncode == 0, logged_in.stderr
        assert logged_in.stdout.strip() == "sim-worker-1"

        assert wait_for_task(api, vm_api.status.stop.post())["exitstatus"] == "OK"
        assert inspect(backend, vmid)[2] == "false"
        assert wait_for_task(api, vm_api.delete(purge=1))["exitstatus"] == "OK"
        assert run(["docker", "inspect", backend.container(vmid)], check=False).returncode != 0
        assert vmid not in [vm["vmid"] for vm in api.cluster.resources.get(type="vm")]


def node_has_image(container, image):
    return run(["docker", "exec", container, "docker", "image", "inspect", "-f", "{{.Id}}", image], check=False)


def template_layer_files(disk: Path) -> dict[Path, tuple[int, int]]:
    """{path under the disk: (size, modification time in ns)} of the regular files in its image layers."""
    return {
        path.relative_to(disk): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in disk.glob("overlay2/*/diff/**/*")
        if path.is_file() and not path.is_symlink()
    }


def test_clones_of_a_golden_template_start_with_its_images_pulled(backend, lab_env, tmp_path):
    """Lab up builds the template's disk with the images asked for; a clone gets it within the clone task, a full
    clone as a copy, a linked clone sharing the layers' files (either way its own: what the clone does leaves the
    template alone), a clone that failed or was destroyed before it started leaves no disk behind, and a VM not
    cloned from the template starts with the node image alone."""
    state = Path(lab_env["env"]["MLFLEET_LAB_STATE"])
    env = {**lab_env["env"], "MLFLEET_LAB_TEMPLATE_IMAGES": "lab/probe"}
    built = run([REPO_ROOT / "lab" / "up.sh"], env=env, timeout=900)
    assert "building template disk base-9000-disk-0 with lab/probe" in built.stderr
    disk = state / "disks" / "base-9000-disk-0" / "docker"
    probe_id = run(["docker", "image", "inspect", "-f", "{{.Id}}", "mlfleet-lab/probe:latest"]).stdout.strip()
    assert Path(f"{disk}.images").read_text() == f"lab/probe {probe_id}\n"
    assert not (disk / "engine-id").exists(), "each clone's dockerd must make its own engine id"
    again = run([REPO_ROOT / "lab" / "up.sh"], env=env, timeout=900)
    assert "building template disk" not in again.stderr, "an unchanged template disk is kept"
    refused = run([REPO_ROOT / "lab" / "up.sh"], env={**env, "MLFLEET_LAB_TEMPLATE_IMAGES": "probe"}, check=False)
    assert refused.returncode != 0 and "name them as lab/<image> (lab/torchserve)" in refused.stderr

    registry = run(["bash", "-c", ". lab/lib.sh && echo $LAB_REGISTRY"], env=env).stdout.strip()
    image = f"{registry}/lab/probe:latest"
    simulator = Simulator(copy.deepcopy(DEFAULT_CONFIG), tmp_path / "sim", backend=backend)
    root = DEFAULT_CONFIG["users"]["root@pam"]
    with running_in_thread(simulator) as url:
        api = ProxmoxAPI(
            "127.0.0.1", port=urllib.parse.urlsplit(url).port, user="root@pam", verify_ssl=str(simulator.certificates.ca_file), timeout=30,
            token_name="admin", token_value=root["tokens"]["admin"]["secret"],
        )  # fmt: skip
        template = next(vm for vm in api.cluster.resources.get(type="vm") if vm["template"])
        assert template["vmid"] == 9000
        template_api = api.nodes(template["node"]).qemu(9000)
        clone_ids = []
        try:
            for vmid, full in ((960, 1), (961, 0)):
                clone_ids.append(vmid)
                assert wait_for_task(api, template_api.clone.post(newid=vmid, name=f"golden-{vmid}", full=full))["exitstatus"] == "OK"
                assert (state / "nodes" / backend.container(vmid) / "docker" / "image").is_dir(), "the clone task copies the disk"
                vm_api = api.nodes(template["node"]).qemu(vmid)
                vm_api.config.put(cores=1, memory=512, ipconfig0="ip=dhcp")
                assert wait_for_task(api, vm_api.status.start.post())["exitstatus"] == "OK"
                wait_for_agent(backend, VM(vmid, vm_api.config.get()))
                assert node_has_image(backend.container(vmid), image).stdout.strip() == probe_id
            # The linked clone shares the layers' files with the template and has its own copy of the databases.
            layer_files = template_layer_files(disk)
            assert layer_files, f"the template disk {disk} has no image layer files"
            sample = next(iter(layer_files))
            full_disk, linked_disk = (state / "nodes" / backend.container(vmid) / "docker" for vmid in (960, 961))
            assert (linked_disk / sample).stat().st_ino == (disk / sample).stat().st_ino, "a linked clone shares the layers"
            assert (full_disk / sample).stat().st_ino != (disk / sample).stat().st_ino, "a full clone copies them"
            repositories = Path("image", "overlay2", "repositories.json")
            assert (linked_disk / repositories).stat().st_ino != (disk / repositories).stat().st_ino
            # What either clone does leaves the template as it was.
            run(["docker", "exec", backend.container(960), "docker", "rmi", image])
            assert node_has_image(backend.container(960), image).returncode != 0
            assert node_has_image(backend.container(961), image).stdout.strip() == probe_id
            # A container that overwrites a file of a shared layer writes its own copy (overlayfs copy-up).
            overwrite = "echo overwritten > /usr/local/bin/mlfleet-probe"
            run(["docker", "exec", backend.container(961), "docker", "run", "--rm", "--entrypoint", "/bin/sh", image, "-c", overwrite])
            run(["docker", "exec", backend.container(961), "docker", "rmi", image])
            assert node_has_image(backend.container(961), image).returncode != 0
            assert "lab/probe" in (disk / "image" / "overlay2" / "repositories.json").read_text()
            assert template_layer_files(disk) == layer_files, "removing the image in a linked clone changed the template"

            assert wait_for_task(api, template_api.clone.post(newid=962, name="never-started"))["exitstatus"] == "OK"
            assert (state / "nodes" / backend.container(962) / "docker").is_dir()
            assert wait_for_task(api, api.nodes(template["node"]).qemu(962).delete())["exitstatus"] == "OK"
            assert not (state / "nodes" / backend.container(962)).exists(), "destroying a VM that never started removes its disk"

            simulator.cluster.faults.clone_failure, simulator.cluster.faults.clone_failures_left = "storage migration failed: disk full", 1
            assert wait_for_task(api, template_api.clone.post(newid=963, name="failed"))["exitstatus"] == "storage migration failed: disk full"
            assert not (state / "nodes" / backend.container(963)).exists(), "a failed clone leaves no disk"
        finally:
            for vmid in clone_ids:
                vm_api = api.nodes(template["node"]).qemu(vmid)
                if vm_api.status.current.get()["status"] == "running":
                    wait_for_task(api, vm_api.status.stop.post())
                wait_for_task(api, vm_api.delete())

    plain = VM(964, {"name": "plain", "cores": 1, "memory": 256, "ipconfig0": "ip=dhcp"})
    try:
        asyncio.run(backend.start(plain))
        wait_for_agent(backend, plain)
        assert node_has_image(backend.container(964), image).returncode != 0, "a VM not cloned from the template has no image pulled"
    finally:
        asyncio.run(backend.stop(plain))
        asyncio.run(backend.destroy(plain))
