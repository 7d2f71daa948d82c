"""Where a build lives: its output folder and each stage's fingerprinted folder in it."""
from __future__ import annotations

from pathlib import Path

from data_specs.build import BuildSpec


def build_dir(spec: BuildSpec) -> Path:
    return Path(spec.output_root).expanduser() / spec.name


def stage_dir(spec: BuildSpec, stage: str, fp: str) -> Path:
    return build_dir(spec) / "stages" / stage / fp
