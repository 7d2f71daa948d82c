"""Where a build lives: its output folder, each stage's fingerprinted folder in it, and the record
of the models it was made with (`recorded`: preflight writes it, publish and releases read it)."""
from __future__ import annotations

import json
from pathlib import Path

from data_specs.build import BuildSpec


def build_dir(spec: BuildSpec) -> Path:
    return Path(spec.output_root).expanduser() / spec.name


def stage_dir(spec: BuildSpec, stage: str, fp: str) -> Path:
    return build_dir(spec) / "stages" / stage / fp


def models_record(spec: BuildSpec) -> Path:
    """The build folder's `models.json`: each role's model and commit, as the first run resolved them."""
    return build_dir(spec) / "models.json"


def recorded(spec: BuildSpec) -> dict | None:
    """The models a build folder was made with, as its first run recorded them."""
    path = models_record(spec)
    return json.loads(path.read_text()) if path.is_file() else None
