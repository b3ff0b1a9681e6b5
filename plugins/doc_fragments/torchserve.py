# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options shared by the TorchServe modules: how a management API is reached."""


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  management_url:
    description:
      - URL of a TorchServe management API that the host running the module reaches directly, for example a
        standalone TorchServe's V(http://127.0.0.1:8081) (its C(management_address)).
    type: str
  management_token:
    description:
      - The management key of a TorchServe that runs with token authorization, sent as a bearer token in the
        C(Authorization) header. TorchServe writes it to its C(key_file.json); it expires after 60 minutes unless renewed.
      - If not set, the environment variable E(TORCHSERVE_MANAGEMENT_TOKEN) is used.
      - It is sent in a header only and never appears in results, errors or command lines.
    type: str
  timeout:
    description:
      - Seconds a single management API request may take. Registering and scaling wait until the workers have
        started or stopped, so this bounds how long a model may take to load.
    type: int
    default: 120
requirements:
  - requests on the host that runs the module
"""
