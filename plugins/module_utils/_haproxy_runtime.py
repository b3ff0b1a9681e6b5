# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The edge proxy's runtime API: HAProxy's admin socket, a Unix socket on the proxy's node, never a TCP port.

Standby replicas sit in their service's backend at weight 0 and take no request; promoting them sets their weight
through this socket. Runtime state lives in the HAProxy process, so every change is also saved with ``show servers
state`` to the server-state file, which HAProxy loads when it starts (``load-server-state-from-file``): a proxy task
that restarts keeps the weights. A ``RuntimeError`` names the socket or server at fault and the fix.
"""

from __future__ import annotations

import os
import socket
import tempfile

# The columns of `show servers state` this code reads (HAProxy 1.6 and later: version 1 of the format).
STATE_COLUMNS = ("be_name", "srv_name", "srv_op_state", "srv_admin_state", "srv_uweight")


class RuntimeSocket:
    """One HAProxy process's admin socket (``stats socket ... level admin``)."""

    def __init__(self, path, timeout=5.0):
        self.path = path
        self.timeout = timeout

    def command(self, line):
        """Send one command, return HAProxy's whole answer (it closes the connection after it)."""
        if "\n" in line:
            raise RuntimeError(f"one HAProxy runtime command at a time, got {line!r}")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(self.timeout)
        try:
            client.connect(self.path)
            client.sendall(line.encode("ascii") + b"\n")
            chunks = []
            while True:
                chunk = client.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except FileNotFoundError:
            raise RuntimeError(
                f"no HAProxy admin socket at {self.path}: deploy the edge proxy with the collection's edge_proxy role, which "
                "mounts edge_proxy_runtime_dir into every proxy task, and run this on a node that runs one"
            ) from None
        except OSError as error:
            raise RuntimeError(f"cannot talk to HAProxy's admin socket {self.path}: {error.strerror or error}") from None
        finally:
            client.close()
        return b"".join(chunks).decode("utf-8", "replace")

    def servers(self, backend=None):
        """``[{backend, name, up, weight, maintenance}]`` of ``show servers state [backend]``."""
        answer = self.command("show servers state" + (f" {backend}" if backend else ""))
        return parse_servers_state(answer, backend)

    def set_weight(self, backend, server, weight):
        answer = self.command(f"set weight {backend}/{server} {int(weight)}").strip()
        if answer:
            raise RuntimeError(f"HAProxy refused the weight {weight} for {backend}/{server}: {answer}")

    def save_state(self, path):
        """Write ``show servers state`` to ``path`` atomically (mode 0600), the file HAProxy loads when it starts.

        The file belongs to the owner of its directory (the proxy's user, which must read it when it starts), also
        when root writes it."""
        answer = self.command("show servers state")
        parse_servers_state(answer)
        directory = os.path.dirname(path) or "."
        owner = os.stat(directory)
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".server-state.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(answer)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o600)
            if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
                os.chown(temporary, owner.st_uid, owner.st_gid)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise


def parse_servers_state(answer, backend=None):
    """The servers of a ``show servers state`` answer; RuntimeError when it is an error or another format."""
    lines = [line for line in answer.splitlines() if line.strip()]
    if not lines or lines[0].strip() != "1" or len(lines) < 2 or not lines[1].startswith("# be_id"):
        first = lines[0][:120] if lines else "nothing"
        where = f" for backend {backend}" if backend else ""
        hint = f"; is there a backend {backend} (the Swarm service's name)?" if backend else ""
        raise RuntimeError(f"HAProxy answered {first!r} to show servers state{where}{hint}")
    header = lines[1][2:].split()
    missing = [column for column in STATE_COLUMNS if column not in header]
    if missing:
        raise RuntimeError(f"show servers state has no column {', '.join(missing)}: a HAProxy of version 1.8 or later is required")
    at = {column: header.index(column) for column in STATE_COLUMNS}
    servers = []
    for line in lines[2:]:
        fields = line.split()
        servers.append(
            {
                "backend": fields[at["be_name"]],
                "name": fields[at["srv_name"]],
                # srv_op_state 2: running; srv_admin_state: a bit field, 0 when no maintenance is forced.
                "up": fields[at["srv_op_state"]] == "2",
                "maintenance": fields[at["srv_admin_state"]] != "0",
                "weight": int(fields[at["srv_uweight"]]),
            }
        )
    return servers
