"""Users, API tokens, tickets, roles, ACLs, and the evaluation of the schema's `permissions` checks.

Modelled on Proxmox's access control: an ACL entry grants roles to a user or token on a path, deeper
entries replace inherited ones, `propagate` decides whether an entry reaches sub-paths, a VM's pool
adds the roles granted on `/pool/<pool>`, and a privilege-separated token holds only what both the
user and the token itself were granted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

TICKET_LIFETIME = 2 * 3600
SUPERUSER = "root@pam"

VM_PRIVILEGES = [
    "VM.Allocate",
    "VM.Audit",
    "VM.Backup",
    "VM.Clone",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Cloudinit",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.Console",
    "VM.GuestAgent.Audit",
    "VM.GuestAgent.FileRead",
    "VM.GuestAgent.FileSystemMgmt",
    "VM.GuestAgent.FileWrite",
    "VM.GuestAgent.Unrestricted",
    "VM.Migrate",
    "VM.PowerMgmt",
    "VM.Replicate",
    "VM.Snapshot",
    "VM.Snapshot.Rollback",
]
DATASTORE_PRIVILEGES = ["Datastore.Allocate", "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit"]
SYSTEM_PRIVILEGES = ["Sys.Audit", "Sys.Console", "Sys.Incoming", "Sys.Modify", "Sys.PowerMgmt", "Sys.Syslog", "Sys.AccessNetwork"]
OTHER_PRIVILEGES = [
    "Pool.Allocate",
    "Pool.Audit",
    "SDN.Allocate",
    "SDN.Audit",
    "SDN.Use",
    "Mapping.Audit",
    "Mapping.Modify",
    "Mapping.Use",
    "Group.Allocate",
    "Permissions.Modify",
    "Realm.Allocate",
    "Realm.AllocateUser",
    "User.Modify",
]
ALL_PRIVILEGES = frozenset(VM_PRIVILEGES + DATASTORE_PRIVILEGES + SYSTEM_PRIVILEGES + OTHER_PRIVILEGES)

# Proxmox VE 9's built-in roles.
BUILTIN_ROLES: dict[str, frozenset[str]] = {
    "Administrator": ALL_PRIVILEGES,
    "NoAccess": frozenset(),
    # pve-access-control's create_roles leaves Mapping.Modify to Administrator and PVEMappingAdmin.
    "PVEAdmin": ALL_PRIVILEGES - {"Sys.PowerMgmt", "Sys.Modify", "Realm.Allocate", "Permissions.Modify", "Mapping.Modify"},
    "PVEAuditor": frozenset({"Datastore.Audit", "Mapping.Audit", "Pool.Audit", "SDN.Audit", "Sys.Audit", "VM.Audit", "VM.GuestAgent.Audit"}),
    "PVEDatastoreAdmin": frozenset(DATASTORE_PRIVILEGES),
    "PVEDatastoreUser": frozenset({"Datastore.AllocateSpace", "Datastore.Audit"}),
    "PVEMappingAdmin": frozenset({"Mapping.Audit", "Mapping.Modify", "Mapping.Use"}),
    "PVEMappingUser": frozenset({"Mapping.Audit", "Mapping.Use"}),
    "PVEPoolAdmin": frozenset({"Pool.Allocate", "Pool.Audit"}),
    "PVEPoolUser": frozenset({"Pool.Audit"}),
    "PVESDNUser": frozenset({"SDN.Audit", "SDN.Use"}),
    "PVESysAdmin": frozenset({"Sys.Audit", "Sys.Console", "Sys.Syslog", "Sys.Incoming", "Sys.AccessNetwork", "Sys.Modify", "Sys.PowerMgmt"}),
    "PVETemplateUser": frozenset({"VM.Clone", "VM.Audit"}),
    "PVEVMAdmin": frozenset(VM_PRIVILEGES),
    "PVEVMUser": frozenset({"VM.Audit", "VM.Backup", "VM.Config.CDROM", "VM.Config.Cloudinit", "VM.Console", "VM.PowerMgmt", "VM.GuestAgent.Audit"}),
}


class AuthenticationFailed(Exception):
    """HTTP 401."""


class PermissionDenied(Exception):
    """HTTP 403; the message names what is missing, as Proxmox's "Permission check failed (path, priv)"."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user (ticket) or one of its API tokens."""

    userid: str
    tokenid: str | None = None
    privsep: bool = False

    @property
    def authid(self) -> str:
        return f"{self.userid}!{self.tokenid}" if self.tokenid else self.userid


@dataclass(frozen=True)
class AclEntry:
    path: str
    ugid: str
    role: str
    propagate: bool = True


@dataclass
class Token:
    secret: str
    privsep: bool = True


@dataclass
class User:
    userid: str
    password: str | None
    tokens: dict[str, Token] = field(default_factory=dict)
    enabled: bool = True


def normalize_path(path: str) -> str:
    return "/" + "/".join(part for part in path.split("/") if part)


def _path_prefixes(path: str) -> list[str]:
    parts = [part for part in path.split("/") if part]
    return ["/"] + ["/" + "/".join(parts[: index + 1]) for index in range(len(parts))]


class AccessControl:
    """Credentials and privileges; `pool_of` tells which pool a VM (by id) belongs to."""

    def __init__(self, users: dict[str, User], acl: list[AclEntry], roles: dict[str, frozenset[str]], pool_of: Callable[[int], str | None]):
        self.users = users
        self.acl = acl
        self.roles = {**BUILTIN_ROLES, **roles}
        self.pool_of = pool_of
        self._ticket_key = secrets.token_bytes(32)
        self._acl_at: dict[tuple[str, str], list[AclEntry]] = {}
        self._acl_cache: dict[tuple[str, str], frozenset[str]] = {}
        for entry in acl:
            self._acl_at.setdefault((entry.ugid, normalize_path(entry.path)), []).append(entry)
        unknown_roles = {entry.role for entry in acl} - set(self.roles)
        if unknown_roles:
            raise ValueError(f"ACL names unknown roles: {', '.join(sorted(unknown_roles))}")

    # --- authentication -------------------------------------------------------------------------

    def login(self, username: str, password: str, realm: str | None, now: float) -> tuple[str, str, str]:
        """(userid, ticket, CSRF token) for valid credentials, else AuthenticationFailed."""
        userid = username if "@" in username else f"{username}@{realm or 'pam'}"
        user = self.users.get(userid)
        expected = (user.password or "") if user else ""
        # Compare even for unknown users, so timing does not reveal which user names exist.
        password_ok = hmac.compare_digest(expected.encode(), password.encode())
        if user is None or not user.enabled or user.password is None or not password_ok:
            raise AuthenticationFailed("authentication failure")
        stamp = f"{int(now):08X}"
        plain = f"PVE:{userid}:{stamp}"
        ticket = f"{plain}::{self._sign(plain)}"
        return userid, ticket, self.csrf_token(userid, stamp)

    def csrf_token(self, userid: str, stamp: str) -> str:
        return f"{stamp}:{self._sign(f'{stamp}:{userid}')[:43]}"

    def check_ticket(self, ticket: str, now: float) -> tuple[Principal, str]:
        """The principal a ticket stands for, and the ticket's time stamp (for the CSRF check)."""
        match = re.fullmatch(r"(PVE:(?P<userid>[^:]+):(?P<stamp>[0-9A-F]{8}))::(?P<signature>.+)", ticket)
        if not match or not hmac.compare_digest(self._sign(match[1]), match["signature"]):
            raise AuthenticationFailed("invalid ticket")
        if not 0 <= now - int(match["stamp"], 16) < TICKET_LIFETIME:
            raise AuthenticationFailed("ticket expired")
        user = self.users.get(match["userid"])
        if user is None or not user.enabled:
            raise AuthenticationFailed("invalid ticket")
        return Principal(match["userid"]), match["stamp"]

    def check_csrf(self, principal: Principal, stamp: str, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(self.csrf_token(principal.userid, stamp), token)

    def check_token(self, header_value: str) -> Principal:
        """`PVEAPIToken=user@realm!tokenid=secret` (also with `:` before the secret, as older clients send)."""
        match = re.fullmatch(r"PVEAPIToken=(?P<userid>[^!\s]+)!(?P<tokenid>[^=:\s]+)[=:](?P<secret>\S+)", header_value.strip())
        if not match:
            raise AuthenticationFailed("invalid token value")
        user = self.users.get(match["userid"])
        token = user.tokens.get(match["tokenid"]) if user else None
        expected = token.secret if token else ""
        secret_ok = hmac.compare_digest(expected.encode(), match["secret"].encode())
        if user is None or token is None or not user.enabled or not secret_ok:
            raise AuthenticationFailed("invalid token value")
        return Principal(match["userid"], match["tokenid"], token.privsep)

    def _sign(self, text: str) -> str:
        digest = hmac.new(self._ticket_key, text.encode(), hashlib.sha256).digest()
        return base64.b64encode(digest).decode()

    # --- authorization --------------------------------------------------------------------------

    def privileges(self, principal: Principal, path: str) -> frozenset[str]:
        """What `principal` may do on `path`."""
        path = normalize_path(path)
        user_privileges = ALL_PRIVILEGES if principal.userid == SUPERUSER else self._granted(principal.userid, path)
        if principal.tokenid and principal.privsep:
            return user_privileges & self._granted(principal.authid, path)
        return user_privileges

    def _granted(self, ugid: str, path: str) -> frozenset[str]:
        privileges = self._acl_privileges(ugid, path)
        vm = re.fullmatch(r"/vms/(\d+)", path)
        pool = self.pool_of(int(vm[1])) if vm else None
        if pool:
            # Proxmox mounts the pool's ACLs on top of its member VMs' paths.
            privileges |= self._acl_privileges(ugid, f"/pool/{pool}")
        return privileges

    def _acl_privileges(self, ugid: str, path: str) -> frozenset[str]:
        # ACLs are fixed once configured, so each (ugid, path) is worked out once: lists of 1000 VMs stay fast.
        key = (ugid, path)
        if key not in self._acl_cache:
            self._acl_cache[key] = self._walk_acl(ugid, path)
        return self._acl_cache[key]

    def _walk_acl(self, ugid: str, path: str) -> frozenset[str]:
        roles: list[str] = []
        for prefix in _path_prefixes(path):
            entries = [entry for entry in self._acl_at.get((ugid, prefix), []) if entry.propagate or prefix == path]
            if entries:
                # Deeper ACL entries replace what was inherited from above.
                roles = [entry.role for entry in entries]
        privileges: frozenset[str] = frozenset()
        for role in roles:
            privileges |= self.roles[role]
        return privileges

    def require(self, principal: Principal, path: str, privileges: list[str], any_of: bool = False) -> None:
        """Raise PermissionDenied unless the principal holds all (or, with any_of, one) of `privileges` on `path`."""
        path = normalize_path(path)
        held = self.privileges(principal, path)
        if any_of:
            if not held & set(privileges):
                raise PermissionDenied(f"Permission check failed ({path}, {'|'.join(privileges)})")
            return
        for privilege in privileges:
            if privilege not in held:
                raise PermissionDenied(f"Permission check failed ({path}, {privilege})")

    def allowed(self, principal: Principal, path: str, privileges: list[str], any_of: bool = False) -> bool:
        try:
            self.require(principal, path, privileges, any_of)
        except PermissionDenied:
            return False
        return True

    def check_schema_permissions(self, principal: Principal | None, permissions: dict, params: dict[str, str]) -> None:
        """Evaluate a route's `permissions` field; routes with only a description check inside their handler."""
        if permissions.get("user") == "world":
            return
        if principal is None:
            raise AuthenticationFailed("No ticket")
        check = permissions.get("check")
        if check is not None:
            self._evaluate(principal, check, params)

    def _evaluate(self, principal: Principal, check: list, params: dict[str, str]) -> None:
        head = check[0]
        if head == "and":
            for sub_check in check[1:]:
                self._evaluate(principal, sub_check, params)
            return
        if head == "or":
            failures = []
            for sub_check in check[1:]:
                try:
                    self._evaluate(principal, sub_check, params)
                except PermissionDenied as denied:
                    failures.append(str(denied).removeprefix("Permission check failed "))
                else:
                    return
            raise PermissionDenied("Permission check failed " + " or ".join(failures))
        if head != "perm":
            raise PermissionDenied(f"Permission check failed (unsupported check '{head}')")
        _perm, template, privileges, *options = check
        option_map = dict(zip(options[::2], options[1::2], strict=False))
        required_param = option_map.get("require_param")
        if required_param and params.get(required_param) in (None, ""):
            raise PermissionDenied(f"Permission check failed (parameter '{required_param}' missing)")
        path = re.sub(r"\{(\w+)\}", lambda found: str(params.get(found[1], "")), template)
        self.require(principal, path, privileges, any_of=bool(option_map.get("any")))
