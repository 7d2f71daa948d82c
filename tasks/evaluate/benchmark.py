"""The Benchmark interface: what the `evaluate` and `music-generate` flows, the pipeline and the
`music` CLI know of a benchmark, so none of them branches on its name. A benchmark is one module
holding a `Benchmark` (DreamBench's in `dreambench.py`, MSIC's in `cases.py`) and one line in
`registry.py`.

Every hook is a plain function with no Prefect (the CLI reads the registry before the server starts
and Prefect reads its settings at import): the flows fan the shard hooks out as task runs
(`shard_tasks.py`), a notebook may call them in a loop. An evaluation runs

1. `prepare(spec, inputs, fill, logger)`: check the inputs (a one-line error before any shard runs),
   render what is missing with the eval spec's generator where the benchmark can (`fill` runs
   `fill_shard` over the shards it is given), and list the scoring shards;
2. `score_shard(spec_json, shard, work_dir, **arguments)` per shard not yet done: its scores in
   `work_dir`, marker last;
3. `finish(spec, prepared, work_dir, extra)`: every output from the shards' files; returns
   {"summary", "report", "tables"}.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_specs.eval import EvalSpec, Metric
from data_specs.train import TrainSpec

# Runs a shard hook over each shard's keyword arguments (the flows: one task run each) and returns
# the shards' results in order.
ShardRunner = Callable[[list[dict]], list[dict]]


@dataclass(frozen=True)
class Prepared:
    """One run's work, known before its first shard runs."""

    inputs: str  # what the outputs depend on besides the spec: hashed into their folder's fingerprint
    shards: list[dict]  # each shard's keyword arguments to the shard hook (JSON: they travel to task runs)
    state: Any = None  # what the benchmark's `finish` reads besides the shards' files


@dataclass(frozen=True)
class Generation:
    """How the MUSIC model generates on a benchmark (the `music-generate` flow)."""

    wanted: Callable[[TrainSpec], bool]  # the training spec's `evaluation` section asks for it (the pipeline)
    plan: Callable[[TrainSpec, Any], Prepared]  # (spec, logger): the inputs and the shards
    generate_shard: Callable[..., dict]  # (spec_json, adapters, shard, out_dir, **arguments) -> marker
    finish: Callable[[Path, Prepared], tuple[dict, dict]]  # (output folder, plan) -> (result fields, `evaluate`'s inputs)
    check: Callable[[TrainSpec], None] | None = None  # `music generate`'s check before the server starts


@dataclass(frozen=True)
class Benchmark:
    name: str  # the one name: flows, CLI, folders, summaries
    metrics: tuple[Metric, ...]  # the headline scores: the Pass@N curve, the pipeline report, the command line
    prepare: Callable[[EvalSpec, dict, ShardRunner, Any], Prepared]
    score_shard: Callable[..., dict]
    finish: Callable[[EvalSpec, Prepared, Path, dict], dict]
    fill_shard: Callable[..., dict] | None = None  # (spec_json, shard, **arguments): renders missing inputs
    generation: Generation | None = None  # None: the MUSIC model does not generate on it
    fingerprint_name: str = ""  # hashed into the shards' fingerprint in place of `name` (see cases.py)

    @property
    def fingerprint_key(self) -> str:
        return self.fingerprint_name or self.name
