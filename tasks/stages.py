"""The training-set stages, in order: the one list everything else derives from (the build flow,
the funnel, the cost plan's units and roles, the tests). It imports no Prefect, so a notebook, a
benchmark or a test runs stages without a server.

Adding a stage is one module that defines its `Stage` (tasks.contract) plus one line here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_specs.build import BuildSpec
from tasks import annotate, compose, decimate, detect, layout, rerender, synthesize, verify
from tasks import filter as filter_stage
from tasks.build_paths import stage_dir
from tasks.contract import Stage, fingerprint, root_fingerprint

STAGES: list[Stage] = [
    compose.STAGE, synthesize.STAGE, detect.STAGE, verify.STAGE, rerender.STAGE,
    annotate.STAGE, layout.STAGE, decimate.STAGE, filter_stage.STAGE,
]
BY_NAME = {stage.name: stage for stage in STAGES}


@dataclass(frozen=True)
class ChainLink:
    """One stage as a spec builds it: its fingerprint, its output folder and the folder it reads
    (None for the first stage, which reads source indices)."""

    stage: Stage
    fingerprint: str
    folder: Path
    upstream_dir: Path | None


def stage_chain(spec: BuildSpec) -> list[ChainLink]:
    """Every stage's fingerprint and folders for `spec`, each fingerprint chained to the one before:
    the one walk of the chain that the build flow, `music clean` and the benchmarks share."""
    links: list[ChainLink] = []
    upstream, upstream_dir = root_fingerprint(spec), None
    for stage in STAGES:
        fp = fingerprint(stage, spec, upstream)
        links.append(ChainLink(stage, fp, stage_dir(spec, stage.name, fp), upstream_dir))
        upstream, upstream_dir = fp, links[-1].folder
    return links
