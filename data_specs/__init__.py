"""Declarative specs: pydantic models, shipped YAML spec files and category lists. Imports nothing of ours."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml


def shipped(name: str) -> Path:
    """Path of a file shipped in this package (spec YAMLs, data/)."""
    return Path(str(resources.files("data_specs").joinpath(name)))


def resolve_spec_path(path: str | Path) -> Path:
    """A spec path as given, or, for a bare file name that does not exist here, the shipped spec."""
    path = Path(path)
    if not path.exists() and path.parent == Path(".") and shipped(path.name).exists():
        return shipped(path.name)
    return path


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file, naming the file in the error when it is not valid YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"spec file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
