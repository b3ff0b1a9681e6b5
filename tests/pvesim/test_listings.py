"""Lists as Proxmox fills them in: nodes, containers, pool members with their stats, storage content."""

from __future__ import annotations

from pvesim_support import TEMPLATE, Sim

from lab.pvesim.tasks import Clock

STATS = {"name", "status", "uptime", "template", "maxcpu", "cpu", "maxmem", "mem", "maxdisk", "disk", "netin", "netout", "diskread", "diskwrite"}


def test_nodes_carry_id_and_type(sim: Sim):
    nodes = sim.data("GET", "/nodes")
    assert [(entry["id"], entry["type"], entry["status"]) for entry in nodes] == [(f"node/pve{n}", "node", "online") for n in (1, 2, 3)]
    assert {"maxcpu", "maxmem", "maxdisk", "mem", "disk", "cpu", "uptime", "level", "ssl_fingerprint"} <= set(nodes[0])


def test_offline_node_is_listed_without_usage(sim: Sim):
    sim.admin("PUT", "faults", json={"offline_nodes": ["pve3"]})
    offline = sim.data("GET", "/nodes")[2]
    assert offline["status"] == "offline" and "uptime" not in offline and "mem" not in offline and offline["maxmem"] > 0


def test_a_node_without_containers_lists_none(sim: Sim):
    assert sim.data("GET", "/nodes/pve1/lxc") == []
    assert {"name": "lxc"} in sim.data("GET", "/nodes/pve1")
    assert sim.call("GET", "/nodes/nosuchnode/lxc").status_code == 500


class LateClock(Clock):
    """Wall time that a test can move forward."""

    offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


def test_pool_members_carry_their_resource_stats(make_sim):
    clock = LateClock()
    sim = make_sim(clock=clock)
    sim.clone(1000, pool="mlfleet", name="worker-a")
    sim.clone(101, pool="mlfleet", name="worker-b")
    sim.wait_task(sim.data("POST", "/nodes/pve1/qemu/101/status/start"))
    by_path = sim.data("GET", "/pools/mlfleet")
    by_query = sim.data("GET", "/pools", params={"poolid": "mlfleet"})
    assert by_query == [by_path] and by_path["poolid"] == "mlfleet" and by_path["comment"] == "model-serving workers"
    members = by_path["members"]
    assert [member["vmid"] for member in members] == [1000, 101], "Proxmox sorts the member ids as strings"
    assert all(STATS <= set(member) and member["id"] == f"qemu/{member['vmid']}" for member in members)
    resources = {entry["vmid"]: entry for entry in sim.data("GET", "/cluster/resources", params={"type": "vm"})}
    for member in members:
        # The fields /cluster/resources adds are lock, tags and pool; uptime may have ticked between the two calls.
        assert member.keys() == resources[member["vmid"]].keys() - {"pool", "tags", "lock"}
        assert {key: value for key, value in member.items() if key != "uptime"} == {key: resources[member["vmid"]][key] for key in member if key != "uptime"}
    assert [(member["name"], member["status"]) for member in members] == [("worker-a", "stopped"), ("worker-b", "running")]
    assert sim.data("GET", "/pools/mlfleet", params={"type": "lxc"})["members"] == []
    clock.offset = 60
    pool = next(entry for entry in sim.data("GET", "/cluster/resources") if entry["type"] == "pool")
    assert (pool["maxmem"], pool["maxcpu"]) == (resources[101]["maxmem"], resources[101]["maxcpu"]), "a pool sums its running guests"
    assert pool["uptime"] >= 60


def test_unknown_pool_is_an_error_in_both_forms(sim: Sim):
    for path, params in (("/pools", {"poolid": "nosuch"}), ("/pools/nosuch", {})):
        response = sim.call("GET", path, params=params)
        assert (response.status_code, response.reason) == (500, "pool 'nosuch' does not exist")


def test_storage_content_lists_templates_and_vm_images(sim: Sim):
    sim.clone(200, full=1, storage="local-lvm")
    sim.clone(201)
    sim.clone(202, target="pve2")
    shared = sim.data("GET", "/nodes/pve1/storage/slow-nfs/content")
    assert [(entry["volid"], entry["vmid"], entry["content"], entry["format"]) for entry in shared] == [
        ("slow-nfs:base-9000-disk-0", TEMPLATE, "images", "raw"),
        ("slow-nfs:vm-201-disk-0", 201, "images", "raw"),
        ("slow-nfs:vm-202-disk-0", 202, "images", "raw"),
    ]
    assert shared[0]["size"] == 8 * 1024**3 and all(entry["ctime"] > 0 for entry in shared)
    assert sim.data("GET", "/nodes/pve2/storage/slow-nfs/content") == shared, "a shared storage lists the same on every node"
    assert [entry["volid"] for entry in sim.data("GET", "/nodes/pve1/storage/local-lvm/content")] == ["local-lvm:vm-200-disk-0"]
    assert sim.data("GET", "/nodes/pve2/storage/local-lvm/content") == [], "a local storage holds only its node's volumes"
    only_201 = sim.data("GET", "/nodes/pve1/storage/slow-nfs/content", params={"vmid": 201, "content": "images"})
    assert [entry["volid"] for entry in only_201] == ["slow-nfs:vm-201-disk-0"]
    assert sim.data("GET", "/nodes/pve1/storage/slow-nfs/content", params={"content": "iso"}) == []
    assert sim.data("GET", "/nodes/pve1/storage/local-lvm/content", params={"content": "backup"}) == []
    missing = sim.call("GET", "/nodes/pve1/storage/nosuch/content")
    assert (missing.status_code, missing.reason) == (500, "storage 'nosuch' does not exist")
