"""The examples' own code, for the tests: examples/*/make_data.py loaded by file path (the
example folders are not packages; their names have hyphens) and their specs read with the
project's spec loader."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from protocol import spec as specmod

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ("mnist-cnn-idx", "tabular-csv", "image-folder", "regression")


def make_data(name: str) -> ModuleType:
    """examples/NAME/make_data.py as a module (loaded once)."""
    key = f"examples_{name.replace('-', '_')}_make_data"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, EXAMPLES / name / "make_data.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def example_spec(name: str) -> dict[str, Any]:
    """examples/NAME/spec.toml, validated (protocol.spec.load)."""
    return specmod.load(EXAMPLES / name / "spec.toml")
