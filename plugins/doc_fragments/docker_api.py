# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection options shared by the swarm modules: how a Docker Engine API is reached."""


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  docker_host:
    description:
      - The Docker Engine API of the node the module acts on.
      - V(unix:///var/run/docker.sock) (the default) is the local socket of the host the module runs on.
      - V(ssh://user@host[:port]) reaches a node over SSH. The node's Docker socket is forwarded to a
        private socket on the host running the module by the system's OpenSSH client, so SSH keys, the agent,
        known hosts and C(~/.ssh/config) apply as for Ansible. The Docker API never listens on TCP.
      - The SSH user must be allowed to use the node's Docker socket (the C(docker) group, see the
        C(docker_engine_socket_users) variable of the mlfleet.serving.docker_engine role).
    type: str
    default: unix:///var/run/docker.sock
  ssh_private_key_file:
    description:
      - Private key for C(ssh://) endpoints, as C(ssh -i). Without it OpenSSH uses the agent and its defaults.
    type: path
  ssh_args:
    description:
      - Extra OpenSSH client arguments for C(ssh://) endpoints, one shell-quoted string, for example the value
        of C(ansible_ssh_common_args).
    type: str
    default: ""
  ssh_remote_socket:
    description:
      - Path of the Docker socket on nodes reached over SSH.
    type: str
    default: /var/run/docker.sock
  connect_timeout:
    description:
      - Seconds to wait for an SSH connection to be established.
    type: int
    default: 10
  api_timeout:
    description:
      - Seconds a single Docker API call may take.
    type: int
    default: 60
requirements:
  - docker (the Docker SDK for Python) on the host that runs the module
  - the OpenSSH client on that host for C(ssh://) endpoints
"""
