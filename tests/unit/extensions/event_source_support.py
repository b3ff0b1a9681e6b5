"""The collection's event sources, loaded from their files as ansible-rulebook loads them (they are no importable package)."""

import importlib.util
import sys
from pathlib import Path

EVENT_SOURCES = Path(__file__).resolve().parents[3] / "extensions" / "eda" / "plugins" / "event_source"


def load_event_source(name: str):
    """extensions/eda/plugins/event_source/<name>.py as a module named mlfleet_serving_<name>."""
    spec = importlib.util.spec_from_file_location(f"mlfleet_serving_{name}", EVENT_SOURCES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
