# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection options shared by the Proxmox VE modules and the proxmox inventory plugin."""


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  api_host:
    description:
      - Host name or address of a Proxmox VE node that serves the API.
      - Falls back to the E(PROXMOX_HOST) environment variable.
    type: str
    required: true
  api_port:
    description:
      - Port of the Proxmox VE API.
      - Falls back to E(PROXMOX_PORT).
    type: int
    default: 8006
  api_user:
    description:
      - User of the API login or owner of the token, as C(user@realm), for example V(automation@pve).
      - Falls back to E(PROXMOX_USER).
    type: str
    required: true
  api_password:
    description:
      - Password of O(api_user) for a ticket login. Prefer an API token.
      - Falls back to E(PROXMOX_PASSWORD).
      - Mutually exclusive with O(api_token_secret); one of them is required.
    type: str
  api_token_id:
    description:
      - Name of an API token of O(api_user) (the part after C(!)), for example V(mlfleet).
      - Falls back to E(PROXMOX_TOKEN_ID). Required with O(api_token_secret).
    type: str
  api_token_secret:
    description:
      - Secret of the API token O(api_token_id). Keep it in a vault; it is never logged.
      - Falls back to E(PROXMOX_TOKEN_SECRET).
    type: str
  validate_certs:
    description:
      - Verify the API's TLS certificate. Turn off only on a lab cluster; prefer O(ca_path).
      - Falls back to E(PROXMOX_VALIDATE_CERTS).
    type: bool
    default: true
  ca_path:
    description:
      - CA certificate (PEM) that signed the API's certificate, for clusters with their own CA.
      - Falls back to E(PROXMOX_CA_PATH).
    type: path
  api_timeout:
    description:
      - Seconds to wait for one API answer.
      - Falls back to E(PROXMOX_API_TIMEOUT).
    type: int
    default: 30
requirements:
  - proxmoxer >= 2.0
  - requests
"""

    # Inventory plugins take their options from Ansible's configuration system, not from an argspec:
    # these `env:` entries are the inventory's counterpart of the modules' env_fallback. A plugin lists
    # this fragment after DOCUMENTATION, which supplies the descriptions, types and defaults.
    INVENTORY = r"""
options:
  api_host:
    env:
      - name: PROXMOX_HOST
  api_port:
    env:
      - name: PROXMOX_PORT
  api_user:
    env:
      - name: PROXMOX_USER
  api_password:
    env:
      - name: PROXMOX_PASSWORD
  api_token_id:
    env:
      - name: PROXMOX_TOKEN_ID
  api_token_secret:
    env:
      - name: PROXMOX_TOKEN_SECRET
  validate_certs:
    env:
      - name: PROXMOX_VALIDATE_CERTS
  ca_path:
    env:
      - name: PROXMOX_CA_PATH
  api_timeout:
    env:
      - name: PROXMOX_API_TIMEOUT
"""
