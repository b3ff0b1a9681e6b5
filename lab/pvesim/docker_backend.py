"""The `docker` backend: a started VM is a lab node container from the golden image.

Everything about how a node container is run lives in lab/lib.sh (`lab_start_node`,
`lab_remove_nodes`, `node_ready`), which lab/up.sh uses too; this backend only translates a VM's
Proxmox config into those calls:

- cores x sockets -> the container's CPU limit, or cpulimit where it is lower (Proxmox caps the guest's CPU
  time at cpulimit CPUs however many cores it sees), memory (MiB) -> its memory limit (no swap), both
  re-applied at every start as Proxmox applies a changed config at the next boot;
- ipconfig0 `ip=<cidr>` -> the container's address on the lab network (it must lie in the lab
  subnet), `ip=dhcp` or none -> an address Docker's IPAM hands out, like a DHCP lease;
- net0's MAC -> the MAC of the node's eth0 (set by its init); name -> its host name;
- ciuser and the URL-encoded sshkeys -> the node init's cloud-init stand-in, so Ansible can log in.
  As with a cloud-init instance id, they are read when the VM first boots.
- a clone's disk (the node's Docker data) comes from its template's disk where the lab built one
  (MLFLEET_LAB_TEMPLATE_IMAGES: a golden template with images pulled), within the clone task: a full clone's
  is a copy, a linked clone's shares the image layers' contents, which its dockerd only reads, and copies the
  rest (lab_clone_disk in lab/lib.sh); else it starts empty, from the node image alone.
- a container of the same name left by another lab instance (lab_instance in lab/lib.sh) is not
  this VM's disk: it is removed and the VM created afresh.

The guest agent answers once the node's sshd and dockerd do, and reports what `ip addr` shows inside
the node: every interface, lo and the node's own Docker bridges included, as a real agent would.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import urllib.parse
from pathlib import Path

from .backend import BackendError, GuestView, boot_volume, is_linked_clone
from .formats import IPCONFIG, NET, parse_property_string

LAB_LIB = Path(__file__).resolve().parents[1] / "lib.sh"
DEFAULT_MEMORY_MIB = 512  # Proxmox's default when a VM config has no `memory`
AGENT_FAMILY = {"inet": "ipv4", "inet6": "ipv6"}
INSTANCE_LABEL = "io.mlfleet.lab.instance"  # set by lab_start_node


def cpu_limit(config: dict) -> str:
    """The container's `--cpus` for a VM config: cores x sockets, or cpulimit where it is set (above 0) and lower."""
    cpus = float(int(config.get("cores", 1)) * int(config.get("sockets", 1)))
    cpulimit = float(config.get("cpulimit", 0) or 0)
    if 0 < cpulimit < cpus:
        cpus = cpulimit
    return f"{cpus:g}"


async def _run(*args: str, check: bool = True) -> str:
    process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await process.communicate()
    if check and process.returncode != 0:
        raise BackendError(f"{' '.join(args[:3])} failed: {stderr.decode().strip() or stdout.decode().strip()}")
    return stdout.decode()


async def _lab(function: str, *args: str, check: bool = True) -> str:
    """Call a lab/lib.sh function with the lab settings of this process's environment."""
    return await _run("bash", "-c", '. "$0" && "$@"', str(LAB_LIB), function, *args, check=check)


async def _lab_succeeds(function: str, *args: str) -> bool:
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", '. "$0" && "$@"', str(LAB_LIB), function, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )  # fmt: skip
    return await process.wait() == 0


class DockerBackend:
    def __init__(self, lab_name: str, network: str, subnet: str):
        self.lab_name = lab_name
        self.network = network
        self.subnet = ipaddress.IPv4Network(subnet)

    @classmethod
    async def from_lab_settings(cls) -> DockerBackend:
        """The lab's name, network and subnet as lab/lib.sh resolves them (MLFLEET_LAB_* overrides)."""
        name, network, subnet = (await _lab("lab_settings")).split()
        return cls(name, network, subnet)

    async def _instance(self) -> str:
        return (await _lab("lab_instance")).strip()

    def container(self, vmid: int) -> str:
        # By VM id: Proxmox names may repeat, ids may not.
        return f"{self.lab_name}-vm-{vmid}"

    async def _state(self, vmid: int) -> dict | None:
        output = await _run("docker", "inspect", self.container(vmid), check=False)
        found = json.loads(output or "[]")
        return found[0] if found else None

    def _limits(self, vm: GuestView) -> tuple[str, str]:
        return cpu_limit(vm.config), f"{int(vm.config.get('memory', DEFAULT_MEMORY_MIB))}m"

    def _static_address(self, vm: GuestView) -> str | None:
        ip = parse_property_string(str(vm.config.get("ipconfig0", "")), IPCONFIG).get("ip", "dhcp")
        if ip == "dhcp":
            return None
        address = ipaddress.IPv4Interface(ip)
        if address.ip not in self.subnet or address.ip in (self.subnet.network_address, self.subnet.broadcast_address):
            raise BackendError(
                f"VM {vm.vmid}: ipconfig0 address {address.ip} is not a host address of the lab network {self.network} ({self.subnet}); "
                f"choose one inside it or use ip=dhcp"
            )
        return str(address.ip)

    async def clone(self, source: GuestView, clone: GuestView) -> None:
        if await self._state(clone.vmid) is not None:
            # A VM being created has no disk yet: a container of its name is another VM's leftover.
            await _lab("lab_remove_nodes", self.container(clone.vmid))
        mode = "linked" if is_linked_clone(clone.config) else "full"
        await _lab("lab_clone_disk", boot_volume(source.config) or "none", self.container(clone.vmid), mode)

    async def start(self, vm: GuestView) -> None:
        cpus, memory = self._limits(vm)
        address = self._static_address(vm)
        state = await self._state(vm.vmid)
        if state is not None and state["Config"]["Labels"].get(INSTANCE_LABEL) != await self._instance():
            # Left by an earlier lab of the same name, not a disk of this simulator's VM.
            await _lab("lab_remove_nodes", self.container(vm.vmid))
            state = None
        if state is None:
            await self._create(vm, cpus, memory, address)
            return
        name = self.container(vm.vmid)
        await _run("docker", "update", "--cpus", cpus, "--memory", memory, "--memory-swap", memory, name)
        current = state["NetworkSettings"]["Networks"].get(self.network, {})
        wanted = address or ""
        configured = (current.get("IPAMConfig") or {}).get("IPv4Address", "")
        if wanted != configured:
            await _run("docker", "network", "disconnect", "-f", self.network, name, check=False)
            await _run("docker", "network", "connect", *(["--ip", address] if address else []), self.network, name)
        await _run("docker", "start", name)

    async def _create(self, vm: GuestView, cpus: str, memory: str, address: str | None) -> None:
        extra = ["--label", f"io.mlfleet.lab.vmid={vm.vmid}"]
        if address:
            extra += ["--ip", address]
        mac = parse_property_string(str(vm.config.get("net0", "")), NET).get("macaddr")
        if mac:
            extra += ["-e", f"NODE_MAC={mac.lower()}"]
        if vm.config.get("ciuser"):
            extra += ["-e", f"NODE_CIUSER={vm.config['ciuser']}"]
        keys = urllib.parse.unquote(str(vm.config.get("sshkeys", "")))
        hostname = str(vm.config.get("name") or f"vm{vm.vmid}")
        await _lab("lab_start_node", self.container(vm.vmid), hostname, cpus, memory, keys, *extra)

    async def stop(self, vm: GuestView) -> None:
        if await self._state(vm.vmid) is not None:
            await _run("docker", "stop", "-t", "20", self.container(vm.vmid))

    async def destroy(self, vm: GuestView) -> None:
        if await self._state(vm.vmid) is not None:
            await _lab("lab_remove_nodes", self.container(vm.vmid))
        else:
            await _lab("lab_remove_node_disk", self.container(vm.vmid))

    async def guest_interfaces(self, vm: GuestView) -> list[dict] | None:
        state = await self._state(vm.vmid)
        if state is None or not state["State"]["Running"]:
            return None
        if not await _lab_succeeds("node_ready", self.container(vm.vmid)):
            return None
        links = json.loads(await _run("docker", "exec", self.container(vm.vmid), "ip", "-j", "addr", "show"))
        return [
            {
                "name": link["ifname"],
                "hardware-address": link.get("address", "00:00:00:00:00:00"),
                "ip-addresses": [
                    {"ip-address-type": AGENT_FAMILY[info["family"]], "ip-address": info["local"], "prefix": info["prefixlen"]}
                    for info in link.get("addr_info", [])
                    if info.get("family") in AGENT_FAMILY
                ],
            }
            for link in links
        ]
