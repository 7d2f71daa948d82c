"""The stage contract, shard I/O, fingerprints and the stage shard runner: what makes every stage resumable.

A `Stage` declares its whole contract in one place: its spec section, the roles it loads, the spec
fields it reads, the columns it writes, the thresholds `music calibrate` reads, what its work counts
and how the plan treats it, and the quality scores it publishes. The engine holds it to that
contract: a stage sees the spec only through a view of its declared fields (any other read raises
`ContractError`), and a column it writes that it did not declare, or that neither `schemas.WORK` nor
its `columns` hold, fails the shard.

A stage's output for shard k lives at `stages/<stage>/<fingerprint>/part-0000k.parquet`, with its
dropped rows beside it (and its scores table, for a stage that declares scores) and a
`.done.json` marker written last (`tasks.engine.markers`). The fingerprint hashes the stage's
name, version, the values of the fields it reads, its roles' content settings (backend, model,
dtype, options: what decides the output) and the upstream fingerprint, so changing a field reruns
the stages that read it and what follows, and nothing else. Execution settings (batch size, device,
offload: how fast, not what) are recorded in each marker instead. Images live once per build in
`ImageStore` (`tasks.engine.image_store`); rows name them by path.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from data_specs.build import BuildSpec, Section, canonical_json
from data_specs.roles import RoleSpec
from data_specs.schemas import DROPPED, SCORES, WORK
from music_model.roles import load_role, peak_memory_bytes, reset_peak_memory, resident_roles
from music_model.roles.base import resolve_device
from music_model.roles.slots import current_device
from safe_files import sha256_file, write_atomic
from tasks.engine.build_paths import build_dir, stage_dir
from tasks.engine.image_store import ImageStore, image_store
from tasks.engine.markers import marker_path, run_marked, scores_path, shard_marker, shard_name

# How a role runs, not what it makes: recorded in markers and the card, never fingerprinted.
EXECUTION_FIELDS = ("batch_size", "device", "offload")
# A hub revision names weights, but the build folder pins them (`tasks.checks.preflight`: a resume whose
# commits changed is refused), so pinning the commit a build already uses keeps every shard.
PINNED_BY_FOLDER = ("revision",)
UNITS = ("rows", "subjects", "sources")
# How the cost plan's funnel passes rows through a stage (`tasks.checks.cost_plan.funnel`).
PLANS = ("rows", "subjects", "decimate", "select")


class ContractError(RuntimeError):
    """A stage did something its `Stage` declaration does not allow (a programming error)."""


def stable_int(*parts: Any) -> int:
    """A 63-bit integer from `parts`, the same on every machine and Python run."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_id(spec: BuildSpec, index: int) -> str:
    return f"{spec.name}-{index:06d}-{stable_int(spec.seed, index, 'id') % 16**6:06x}"


def write_table(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    """Write `rows` as Parquet; a key the schema lacks raises (Arrow would drop it silently)."""
    unknown = set().union(*map(dict.keys, rows)) - set(schema.names) if rows else set()
    if unknown:
        raise ContractError(f"{path.name}: columns {sorted(unknown)} are not in the schema")
    table = pa.Table.from_pylist(rows, schema=schema)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def num_shards(spec: BuildSpec) -> int:
    return -(-spec.num_source_images // spec.shard_size)


def _field_model(annotation: Any) -> type[BaseModel] | None:
    """The section model a spec field holds (`MsicParams | None` -> MsicParams), or None for a value."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def check_read(model: type[BaseModel], path: str) -> None:
    """Raise `ContractError` unless `path` (dotted) is a field of the spec `model`."""
    current: type[BaseModel] | None = model
    for part in path.split("."):
        if current is None or part not in current.model_fields:
            raise ContractError(f"reads: {path!r} is not a field of the build spec")
        current = _field_model(current.model_fields[part].annotation)


def declares(reads: tuple[str, ...], path: str) -> bool:
    return any(path == read or path.startswith(read + ".") for read in reads)


@dataclass(frozen=True)
class Threshold:
    """A spec field (dotted) that cuts one of the stage's scores, dropping what lies `drops` (below,
    above, at_or_above) its value: `music calibrate` reports the score's distribution against it.
    `score`: a name in the stage's scores table, or a field of the subjects it kept. `measured_at`:
    where the score is computed when not in the stage (`publish`, for near duplicates)."""

    field: str
    score: str
    drops: Literal["below", "above", "at_or_above"]
    note: str = ""
    measured_at: str | None = None


@dataclass(frozen=True)
class PublishedScore:
    """A quality-score column of the published set: a value `per` subject (`source`: the subject
    field, published as a list aligned with `subject_ids`) or per sample (`source`: the row column;
    None: computed at publish, as `near_duplicate_clip`). The card's row: `meaning`, `span` and
    `kept(spec)`, what this build kept."""

    column: str
    per: Literal["subject", "sample"]
    source: str | None
    meaning: str
    span: str
    kept: Callable[[BuildSpec], str] = lambda spec: "any"


@dataclass(frozen=True)
class Stage:
    """One stage's whole contract: everything else (the flow's order, the spec's sections, the roles
    a stage loads, the funnel, the plan, `music calibrate`, the published scores and the card, the
    fingerprint) derives from it and `tasks.stages.STAGES`.

    - `params`: its spec section (a `data_specs.build.Section`), the spec field named after the stage.
    - `roles`: the model roles `ctx.role` may load (and the stage keeps resident).
    - `reads`: the spec fields the stage reads, as dotted paths (`"verify.min_subjects"`, or a whole
      section: `"detect"`); they, and only they, are fingerprinted.
    - `writes`: the columns it adds or rewrites, of `schemas.WORK` or its own `columns`; a new column
      it does not declare fails.
    - `columns`: the (name, Arrow type) columns it adds to the working row beyond `schemas.WORK`.
    - `unit`: what its work is proportional to (the cost plan): rows, subjects or distinct sources.
    - `plan`: how the plan's funnel passes rows through it: `rows` (drops rows), `subjects` (removes
      subjects; a row left under `verify.min_subjects` drops), `decimate` (a row becomes one per
      subject count) or `select` (keeps the subject counts within filter's bounds).
    - `scores`: the scores it records with `ctx.score` for every candidate it judges against a
      threshold, kept or not, in `part-0000k.scores.parquet` beside its part (`schemas.SCORES`): a
      dropped candidate's score lives nowhere else, and `music calibrate` needs the whole distribution.
    - `thresholds`: the spec fields that cut its scores (`Threshold`).
    - `published`: the quality-score columns it adds to the published set (`PublishedScore`).
    """

    name: str
    version: int
    process: Callable[[list[dict], "StageContext"], list[dict]]
    params: type[Section] | None = None
    roles: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    columns: tuple[tuple[str, pa.DataType], ...] = ()
    unit: str = "rows"
    plan: str = "rows"
    scores: tuple[str, ...] = ()
    thresholds: tuple[Threshold, ...] = ()
    published: tuple[PublishedScore, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.writes) - set(WORK.names) - {name for name, _ in self.columns})
        if unknown:
            raise ContractError(f"stage {self.name}: writes {unknown}, which neither schemas.WORK nor its columns hold")
        if self.unit not in UNITS:
            raise ContractError(f"stage {self.name}: unit {self.unit!r} is not one of {UNITS}")
        if self.plan not in PLANS:
            raise ContractError(f"stage {self.name}: plan {self.plan!r} is not one of {PLANS}")


def work_schema(upstream: pa.Schema, stage: Stage) -> pa.Schema:
    """The working row a stage writes: its input's columns (`schemas.WORK` and every earlier stage's
    `columns`), then its own."""
    return pa.schema([*upstream, *(pa.field(name, kind) for name, kind in stage.columns if name not in upstream.names)])


class SpecView:
    """The spec as one stage sees it: the fields its `reads` declare, each read recorded in `seen`;
    any other field raises `ContractError`, so no read can escape the fingerprint."""

    def __init__(self, value: BaseModel, stage: Stage, seen: set[str], prefix: str = ""):
        self._value, self._stage, self._seen, self._prefix = value, stage, seen, prefix

    def __getattr__(self, name: str) -> Any:
        path = self._prefix + name
        value = getattr(self._value, name)
        if declares(self._stage.reads, path):
            self._seen.add(path)
            return value
        if isinstance(value, BaseModel) and any(read.startswith(path + ".") for read in self._stage.reads):
            return SpecView(value, self._stage, self._seen, path + ".")
        raise ContractError(f"stage {self._stage.name} reads spec field {path!r}, which its Stage(reads=...) "
                            f"does not declare: {list(self._stage.reads)}")


def spec_values(spec: BuildSpec, paths: tuple[str, ...]) -> dict[str, Any]:
    """Each dotted path's value in the spec, as JSON-able data."""
    dumped = spec.model_dump(mode="json")
    values = {}
    for path in paths:
        value: Any = dumped
        for part in path.split("."):
            value = None if value is None else value[part]
        values[path] = value
    return values


def role_content(role: RoleSpec) -> dict:
    return role.model_dump(mode="json", exclude={*EXECUTION_FIELDS, *PINNED_BY_FOLDER})


def role_execution(role: RoleSpec) -> dict:
    return role.model_dump(mode="json", include=set(EXECUTION_FIELDS))


@dataclass
class Drop:
    row: dict
    reason: str
    detail: str = ""


@dataclass
class StageContext:
    """What `Stage.process` gets: the spec's declared fields, its roles, seeds and the drop log."""

    build: BuildSpec  # the whole spec: the engine's; a stage reads `spec`
    stage: Stage
    shard: int
    model_seconds: float = 0.0
    drops: list[Drop] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)
    reads_seen: set[str] = field(default_factory=set)
    images_written: dict[str, int] = field(default_factory=dict)
    source_root: Path | None = None  # the build folder the input rows' image paths are relative to

    @property
    def spec(self) -> SpecView:
        return SpecView(self.build, self.stage, self.reads_seen)

    def image(self, struct: dict):
        """The image a row's struct names (stored or inline)."""
        return ImageStore(self.source_root or build_dir(self.build)).open(struct)

    def store_image(self, image) -> dict:
        """Store an image this stage made, once by content; the struct its rows hold."""
        struct = image_store(self.build).put(image)
        self.images_written[struct["path"]] = (build_dir(self.build) / struct["path"]).stat().st_size
        return struct

    def role(self, name: str):
        if name not in self.stage.roles:
            raise ContractError(f"stage {self.stage.name} does not declare role {name!r} in its Stage(roles=...)")
        return load_role(self.build.roles[name])

    def seed(self, index: int, salt: str = "") -> int:
        """The seed of sample `index` in this stage: (spec seed, index, stage) hashed."""
        return stable_int(self.build.seed, index, self.stage.name, salt) % (2**31)

    def drop(self, row: dict, reason: str, detail: str = "") -> None:
        self.drops.append(Drop(row, reason, detail[:500]))

    def score(self, row: dict, name: str, value: float, passed: bool, subject: dict | None = None) -> None:
        """Record a candidate's score `name` (declared in `Stage(scores=...)`) for the scores table:
        a subject's (with its id and category) or, without `subject`, the row's."""
        if name not in self.stage.scores:
            raise ContractError(f"stage {self.stage.name} records score {name!r}, which its Stage(scores=...) does not declare")
        self.scores.append({"id": row.get("id"), "index": row.get("index"), "stage": self.stage.name, "name": name,
                            "subject": None if subject is None else subject["id"],
                            "category": None if subject is None else subject["category"], "value": float(value),
                            "passed": bool(passed)})

    def timed(self, method: Callable, *args, **kwargs):
        """Call a role's method under that role's lock, counting the time as model compute."""
        with method.__self__.lock:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.model_seconds += time.perf_counter() - start


def fingerprint(stage: Stage, spec: BuildSpec, upstream: str) -> str:
    roles = {name: role_content(spec.roles[name]) for name in stage.roles}
    payload = {"stage": stage.name, "version": stage.version, "reads": spec_values(spec, stage.reads), "roles": roles,
               "upstream": upstream}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def root_fingerprint(spec: BuildSpec) -> str:
    """What every stage depends on: the sampling inputs of compose. Not the number of sources: a
    source is addressed by its index, so more sources (a raised count, another wave) add shards
    and rerun none; the one shard whose range a new count changes is redone by `shard_input`."""
    categories = hashlib.sha256(spec.categories_path().read_bytes()).hexdigest()
    payload = {"seed": spec.seed, "name": spec.name, "counts": spec.subject_counts, "categories": categories,
               "shard_size": spec.shard_size}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def source_range(spec: BuildSpec, shard: int) -> range:
    """The source indices of a shard: whole shards, the last one cut at `num_source_images`."""
    return range(shard * spec.shard_size, min((shard + 1) * spec.shard_size, spec.num_source_images))


def shard_input(spec: BuildSpec, shard: int, upstream_dir: Path | None) -> str:
    """What a shard is made from: its source range (compose) or the sha256 of its upstream part, as
    that part's marker records it. A marker is reused only for the same input, so a shard whose
    upstream part was redone (or whose range grew) is redone too, and a resumed build equals a fresh one."""
    if upstream_dir is None:
        sources = source_range(spec, shard)
        return f"sources {sources.start}-{sources.stop}"
    part = upstream_dir / f"{shard_name(shard)}.parquet"
    try:
        return json.loads(shard_marker(upstream_dir, shard).read_text())["outputs"][part.name]["sha256"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # rows given without a marker (a test's, a notebook's)
        return sha256_file(part)


def check_columns(stage: Stage, rows_in: list[dict], rows_out: list[dict]) -> None:
    """A stage changes only the columns it declares writing: every other column of an output row
    holds its input row's value (found by id, or by source index for a stage that writes ids)."""
    key = "index" if "id" in stage.writes else "id"
    by_key = {row[key]: row for row in rows_in}
    for row in rows_out:
        source = by_key.get(row.get(key))
        if source is None:
            raise ContractError(f"stage {stage.name} wrote a row whose {key} {row.get(key)!r} is in none of its input rows")
        changed = sorted(column for column in row.keys() | source.keys() if column not in stage.writes
                         and not (row.get(column) is source.get(column) or row.get(column) == source.get(column)))
        if changed:
            raise ContractError(f"stage {stage.name} wrote columns {changed} that its Stage(writes=...) does not declare")


def run_shard(stage: Stage, spec: BuildSpec, shard: int, fp: str, upstream_dir: Path | None) -> dict:
    """Process one shard of one stage, or return its marker when it is already done from the same input."""
    out_dir = stage_dir(spec, stage.name, fp)

    def work() -> tuple[dict, list[Path]]:
        device = current_device()
        reset_peak_memory(device)
        if upstream_dir is None:
            rows, upstream = [{"index": i} for i in source_range(spec, shard)], WORK
        else:
            table = pq.read_table(upstream_dir / f"{shard_name(shard)}.parquet")
            rows, upstream = table.to_pylist(), table.schema
        context = StageContext(spec, stage, shard, source_root=ImageStore.of_stage_dir(upstream_dir).root if upstream_dir else None)
        kept = stage.process(rows, context)
        check_columns(stage, rows, kept)
        dropped = [
            {"id": d.row.get("id"), "index": d.row.get("index"), "stage": stage.name, "reason": d.reason, "detail": d.detail}
            for d in context.drops
        ]
        parts = {out_dir / f"{shard_name(shard)}.parquet": (kept, work_schema(upstream, stage)), out_dir / f"{shard_name(shard)}.dropped.parquet": (dropped, DROPPED)}
        if stage.scores:
            parts[scores_path(out_dir, shard)] = (context.scores, SCORES)
        for path, (table, schema) in parts.items():
            write_table(table, schema, path)
        return {
            "stage": stage.name,
            "shard": shard,
            "fingerprint": fp,
            "rows_in": len(rows),
            "rows_out": len(kept),
            "dropped": dict(sorted(Counter(d["reason"] for d in dropped).items())),
            "model_seconds": round(context.model_seconds, 4),
            "device": device,
            "peak_device_bytes": peak_memory_bytes(device),
            # The models on this shard's device as it ends: the stage's own, nothing left from earlier stages.
            "resident": sorted({role for role, _, on in resident_roles() if on == str(resolve_device(device or "auto"))}),
            "execution": {name: role_execution(spec.roles[name]) for name in stage.roles},
            "reads": sorted(context.reads_seen),
            "images": dict(sorted(context.images_written.items())),
        }, list(parts)

    return run_marked(marker_path(spec, stage.name, fp, shard), work, build_dir(spec), shard_input(spec, shard, upstream_dir))
