"""The training-set stages, in order: the one list everything else derives from (the build spec's
sections, the build flow, the funnel, the cost plan's units and roles, `music calibrate`'s
thresholds, the published score columns and the card, the tests). It imports no Prefect, so a
notebook, a benchmark or a test runs stages without a server.

Adding a stage is one module that defines its `Stage` (tasks.engine.contract), with its spec section,
thresholds and published scores, plus one line here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_specs import build
from data_specs.build import BuildSpec
from data_specs.schemas import published_schema as schema_of
from tasks.engine.build_paths import stage_dir
from tasks.engine.contract import ContractError, PublishedScore, Stage, Threshold, check_read, fingerprint, root_fingerprint
from tasks.stages import annotate, compose, decimate, detect, layout, rerender, synthesize, verify
from tasks.stages import filter as filter_stage

STAGES: list[Stage] = [
    compose.STAGE, synthesize.STAGE, detect.STAGE, verify.STAGE, rerender.STAGE,
    annotate.STAGE, layout.STAGE, decimate.STAGE, filter_stage.STAGE,
]


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"no stage named {name!r}; the stages: {', '.join(s.name for s in STAGES)}")


def published_scores() -> list[PublishedScore]:
    """The published quality-score columns, in stage order."""
    return [score for stage in STAGES for score in stage.published]


def thresholds() -> list[tuple[Stage, Threshold]]:
    """Every threshold a build applies to a score it records, with its stage."""
    return [(stage, threshold) for stage in STAGES for threshold in stage.thresholds]


def spec_model() -> type[BuildSpec]:
    """The build spec model of the stage list: each stage's section, its reads checked against it."""
    names = [stage.name for stage in STAGES]
    if len(set(names)) != len(names):
        raise ContractError(f"stage names repeat: {names}")
    model = build.spec_model(tuple((s.name, s.params) for s in STAGES if s.params),
                             tuple(score.column for score in published_scores()))
    for stage in STAGES:
        for path in stage.reads:
            check_read(model, path)
    return model


def parse_build_spec(data: Any, source: str = "spec") -> BuildSpec:
    return build.parse_build_spec(data, spec_model(), source)


def load_build_spec(path: str | Path) -> BuildSpec:
    """Read and validate a build spec YAML (a name without a folder looks in the shipped specs)."""
    return build.load_build_spec(path, spec_model())


def spec_from_json(text: str) -> BuildSpec:
    """A spec as a task receives it (`spec.model_dump_json()`)."""
    return spec_model().model_validate_json(text)


def published_schema() -> pa.Schema:
    """The published dataset's schema, `datasets` features included."""
    return schema_of([(score.column, score.per) for score in published_scores()])


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
