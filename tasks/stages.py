"""The training-set stages, in order: the one list everything else derives from (the build flow,
the funnel, the cost plan's units and roles, the tests). It imports no Prefect, so a notebook, a
benchmark or a test runs stages without a server.

Adding a stage is one module that defines its `Stage` (tasks.engine) plus one line here."""
from __future__ import annotations

from tasks import annotate, compose, decimate, detect, layout, rerender, synthesize, verify
from tasks import filter as filter_stage
from tasks.engine import Stage

STAGES: list[Stage] = [
    compose.STAGE, synthesize.STAGE, detect.STAGE, verify.STAGE, rerender.STAGE,
    annotate.STAGE, layout.STAGE, decimate.STAGE, filter_stage.STAGE,
]
BY_NAME = {stage.name: stage for stage in STAGES}
