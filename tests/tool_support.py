"""The local tool service (scripts/tool_service.py) for the tool I/O and agent tests, loaded by
path as the scripts are not a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "tool_service.py"


def _load():
    spec = importlib.util.spec_from_file_location("tool_service", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


tool_service = sys.modules.get("tool_service") or _load()
open_tool_service = tool_service.open_tool_service
ToolService = tool_service.ToolService
