# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""TorchServe's ``models`` configuration property from a list of model declarations."""

from __future__ import annotations

import posixpath

from ansible.errors import AnsibleFilterError

# Declaration key -> TorchServe's key, for the per-version settings a replica starts with.
SETTINGS = {
    "min_workers": "minWorkers",
    "max_workers": "maxWorkers",
    "batch_size": "batchSize",
    "max_batch_delay": "maxBatchDelay",
    "response_timeout": "responseTimeout",
}


def torchserve_models_config(models):
    """``{name: {version: {marName, defaultVersion, minWorkers, ...}}}`` for config.properties ``models=``."""
    if not isinstance(models, list):
        raise AnsibleFilterError(f"torchserve_models_config expects a list of models, not {type(models).__name__}")
    config = {}
    for model in models:
        if not isinstance(model, dict) or not model.get("name") or not model.get("file"):
            raise AnsibleFilterError(f"torchserve_models_config: every model needs a name and a file; got {model!r}")
        version = str(model.get("version", "1.0"))
        entry = {"marName": posixpath.basename(str(model["file"])), "defaultVersion": True}
        for key, torchserve_key in SETTINGS.items():
            value = model.get(key, 1 if key in ("min_workers", "max_workers", "batch_size") else None)
            if value is not None:
                entry[torchserve_key] = int(value)
        if entry["minWorkers"] > entry["maxWorkers"]:
            raise AnsibleFilterError(f"model {model['name']}: min_workers {entry['minWorkers']} exceeds max_workers {entry['maxWorkers']}")
        config.setdefault(str(model["name"]), {})[version] = entry
    return config


class FilterModule:
    def filters(self):
        return {"torchserve_models_config": torchserve_models_config}
