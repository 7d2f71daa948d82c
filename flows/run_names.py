"""Names a person can scan in the UI. Flow runs: the flow's prefix and the `name` of the spec the run
was given (`build-tiny`, not `build-/abs/path/to/tiny.yaml`); the spec's path or JSON stays a
parameter of the run. Artifacts: keys made of the spec name and what they show (`artifact_key`)."""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_specs import load_yaml, resolve_spec_path


def spec_name(parameters: dict[str, Any]) -> str:
    """The spec's `name` from a run's `spec_json` or `spec_path` parameter. A spec that cannot be
    read names the run by its file stem: the flow itself then fails with the spec's own error."""
    if "spec_json" in parameters:
        try:
            return str(json.loads(parameters["spec_json"])["name"])
        except (ValueError, KeyError, TypeError):
            return "spec"
    path = str(parameters["spec_path"])
    try:
        return str(load_yaml(resolve_spec_path(path))["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return Path(path).stem


def run_name(prefix: str, *leading: str) -> Callable[[], str]:
    """A `flow_run_name` callable: `<prefix>-<each leading parameter>-<spec name>`."""

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters
        return "-".join([prefix, *(str(parameters[p]) for p in leading), spec_name(parameters)])

    name.__name__ = f"{prefix}_run_name"
    return name


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
