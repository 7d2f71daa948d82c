"""The stage contract, shard I/O, fingerprints and completion markers: what makes every stage resumable.

A `Stage` declares its whole contract in one place: the roles it loads, the spec fields it reads,
the columns it writes and what its work counts. The engine holds it to that contract: a stage sees
the spec only through a view of its declared fields (any other read raises `ContractError`), and a
column it writes that it did not declare, or that `schemas.WORK` lacks, fails the shard.

A stage's output for shard k lives at `stages/<stage>/<fingerprint>/part-0000k.parquet`, with its
dropped rows beside it (and its scores table, for a stage that declares scores) and a
`.done.json` marker written last. The fingerprint hashes the stage's
name, version, the values of the fields it reads, its roles' content settings (backend, model,
dtype, options: what decides the output) and the upstream fingerprint, so changing a field reruns
the stages that read it and what follows, and nothing else. Execution settings (batch size, device,
offload: how fast, not what) are recorded in each marker instead. The marker records each part's
bytes, rows and sha256 and the size of each image the shard stored: a shard is reused only when
they still prove themselves (sizes and Parquet footers; the hashes too with `verify`), and is
redone otherwise. Images live once per build in `ImageStore`; rows name them by path.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout
from pydantic import BaseModel

from data_specs.build import BuildSpec, canonical_json
from data_specs.roles import RoleSpec
from safe_files import sha256_file, write_atomic
from data_specs.schemas import DROPPED, SCORES, WORK
from music_model.roles import (load_role, peak_memory_bytes, reset_peak_memory, resident_roles, thread_load_seconds,
                               thread_model_loads, thread_oom_retries)
from music_model.media.images import from_struct, to_struct
from music_model.roles.base import resolve_device
from music_model.roles.slots import current_device, describe_holders, write_holder

# How a role runs, not what it makes: recorded in markers and the card, never fingerprinted.
EXECUTION_FIELDS = ("batch_size", "device", "offload")
# A hub revision names weights, but the build folder pins them (`tasks.preflight`: a resume whose
# commits changed is refused), so pinning the commit a build already uses keeps every shard.
PINNED_BY_FOLDER = ("revision",)
UNITS = ("rows", "subjects", "sources")


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


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}"


def num_shards(spec: BuildSpec) -> int:
    return -(-spec.num_source_images // spec.shard_size)


def _field_model(annotation: Any) -> type[BaseModel] | None:
    """The section model a spec field holds (`MsicParams | None` -> MsicParams), or None for a value."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _check_read(path: str) -> None:
    model: type[BaseModel] | None = BuildSpec
    for part in path.split("."):
        if model is None or part not in model.model_fields:
            raise ContractError(f"reads: {path!r} is not a field of the build spec")
        model = _field_model(model.model_fields[part].annotation)


def declares(reads: tuple[str, ...], path: str) -> bool:
    return any(path == read or path.startswith(read + ".") for read in reads)


@dataclass(frozen=True)
class Stage:
    """One stage's whole contract: everything else (the flow's order, the roles a stage loads,
    the funnel, the plan's units, the fingerprint) derives from it and `tasks.stages.STAGES`.

    - `roles`: the model roles `ctx.role` may load (and the stage keeps resident).
    - `reads`: the spec fields the stage reads, as dotted paths (`"verify.min_subjects"`, or a whole
      section: `"detect"`); they, and only they, are fingerprinted.
    - `writes`: the `schemas.WORK` columns it adds or rewrites; a new column it does not declare fails.
    - `unit`: what its work is proportional to (the cost plan): rows, subjects or distinct sources.
    - `scores`: the scores it records with `ctx.score` for every candidate it judges against a
      threshold, kept or not, in `part-0000k.scores.parquet` beside its part (`schemas.SCORES`): a
      dropped candidate's score lives nowhere else, and `music calibrate` needs the whole distribution.
    """

    name: str
    version: int
    process: Callable[[list[dict], "StageContext"], list[dict]]
    roles: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    unit: str = "rows"
    scores: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for path in self.reads:
            _check_read(path)
        unknown = sorted(set(self.writes) - set(WORK.names))
        if unknown:
            raise ContractError(f"stage {self.name}: writes {unknown}, which schemas.WORK lacks")
        if self.unit not in UNITS:
            raise ContractError(f"stage {self.name}: unit {self.unit!r} is not one of {UNITS}")


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


class ImageStore:
    """A build's images, each stored once, by content: `images/<aa>/<sha256>.png` under the build
    folder. A stage row holds `{"bytes": None, "path": "images/aa/<sha256>.png"}` (the path form of
    the Hugging Face image layout, relative to the build folder), so a target and every decimated
    sibling of it, in every stage's shard, share one file; a row with its bytes inline is read as is.
    A shard's paths are relative to the build folder it lives in (`of_stage_dir`)."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def of_stage_dir(cls, folder: Path) -> "ImageStore":
        """The store of the build whose `stages/<stage>/<fingerprint>` folder is `folder`."""
        return cls(folder.parents[2])

    def put(self, image) -> dict:
        """Store `image` (PNG, as `to_struct` encodes it) unless it is stored already; the struct naming it."""
        data = to_struct(image)["bytes"]
        digest = hashlib.sha256(data).hexdigest()
        relative = f"images/{digest[:2]}/{digest}.png"
        path = self.root / relative
        if not path.exists() or path.stat().st_size != len(data):
            write_atomic(path, lambda tmp: tmp.write_bytes(data))
        return {"bytes": None, "path": relative}

    def read_bytes(self, struct: dict) -> bytes:
        return struct["bytes"] if struct.get("bytes") is not None else (self.root / struct["path"]).read_bytes()

    def open(self, struct: dict):
        return from_struct({"bytes": self.read_bytes(struct)})

    def embedded(self, struct: dict) -> dict:
        """The struct with its bytes inline, as published files hold it; a stored image whose bytes
        are not its name's (damaged at equal size, which only its sha256 shows) raises `DamagedImage`."""
        data = self.read_bytes(struct)
        if struct.get("bytes") is None and hashlib.sha256(data).hexdigest() != Path(struct["path"]).stem:
            raise DamagedImage(struct["path"])
        return {"bytes": data, "path": None}


class DamagedImage(ValueError):
    """A stored image's bytes have another sha256 than its name: `forget_image` it and redo its shard."""

    def __init__(self, relative: str):
        super().__init__(f"{relative} has another sha256 than its name")
        self.relative = relative


def image_store(spec: BuildSpec) -> ImageStore:
    return ImageStore(build_dir(spec))


def image_problem(root: Path, relative: str, size: int, verify: bool) -> str | None:
    """Why a stored image is not what its shard's marker recorded (the name is its sha256), or None."""
    path = root / relative
    if not path.exists():
        return f"{relative} is missing"
    if path.stat().st_size != size:
        return f"{relative} is {path.stat().st_size} bytes, its marker says {size}"
    if verify and sha256_file(path) != path.stem:
        return f"{relative} has another sha256 than its name"
    return None


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
        return json.loads((upstream_dir / f"{shard_name(shard)}.done.json").read_text())["outputs"][part.name]["sha256"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # rows given without a marker (a test's, a notebook's)
        return sha256_file(part)


def build_dir(spec: BuildSpec) -> Path:
    return Path(spec.output_root).expanduser() / spec.name


def stage_dir(spec: BuildSpec, stage: str, fp: str) -> Path:
    return build_dir(spec) / "stages" / stage / fp


def part_record(path: Path) -> dict:
    """What a marker records of one part it vouches for."""
    return {"bytes": path.stat().st_size, "rows": pq.read_metadata(path).num_rows, "sha256": sha256_file(path)}


def part_problem(path: Path, record: dict, verify: bool) -> str | None:
    """Why the part at `path` is not what its marker recorded, or None when it is."""
    if not path.exists():
        return "is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"is {size} bytes, its marker says {record['bytes']}"
    try:
        rows = pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as error:
        return f"has an unreadable Parquet footer ({str(error).splitlines()[0]})"
    if rows != record["rows"]:
        return f"holds {rows} rows, its marker says {record['rows']}"
    if verify and sha256_file(path) != record["sha256"]:
        return "has another sha256 than its marker's"
    return None


def check_marker(marker: Path, verify: bool = False, images_root: Path | None = None, label: str | None = None,
                 made_from: str | None = None) -> tuple[dict | None, str | None]:
    """The one proof of a finished shard of any kind (a build stage's, an evaluation's, a
    generation's): (marker, None) when every output it records still proves itself (and, under
    `images_root`, every image it records) and, with `made_from`, it was made from that input;
    (None, why) when not, the marker and every output or image that failed removed, so the shard is
    redone and writes them anew; (None, None) for a shard still to do."""
    try:
        done = json.loads(marker.read_text())
    except FileNotFoundError:
        return None, None
    except json.JSONDecodeError:
        done = {}
    outputs = done.get("outputs")
    # path -> why: what failed its check is never trusted again, but removed so the redo writes it
    # anew (the image store keeps a name it holds, and a damaged image keeps its name).
    rejected = {marker.parent / name: f"{name} {problem}" for name, record in (outputs or {}).items()
                if (problem := part_problem(marker.parent / name, record, verify))}
    if images_root is not None:
        rejected |= {images_root / relative: problem for relative, size in done.get("images", {}).items()
                     if (problem := image_problem(images_root, relative, size, verify))}
    problems = ([] if outputs is not None else [f"{marker.name} is unreadable or records no outputs"]) + [*rejected.values()]
    if made_from is not None and done.get("input") != made_from:
        problems.append(f"its input changed ({done.get('input')} -> {made_from})")
    if problems:
        for path in [marker, *rejected]:
            path.unlink(missing_ok=True)
        return None, f"redoing {label or marker.name.removesuffix('.done.json')} of {marker.parent}: {'; '.join(problems)}"
    return {**done, "skipped": True}, None


def forget_image(root: Path, relative: str) -> str:
    """Remove a stored image found damaged (`DamagedImage`) and the markers of the shards that made
    it, so the next pass redoes them and writes it anew; the log line saying so."""
    (root / relative).unlink(missing_ok=True)
    makers = []
    for marker in sorted((root / "stages").glob("*/*/*.done.json")):
        try:
            made = relative in json.loads(marker.read_text()).get("images", {})
        except (OSError, json.JSONDecodeError):
            continue
        if made:
            marker.unlink(missing_ok=True)
            makers.append(marker.relative_to(root).as_posix())
    return f"{relative} has another sha256 than its name: removed, redoing the shards that made it ({', '.join(makers) or 'none found'})"


def finish_marker(marker: Path, summary: dict, outputs: list[Path]) -> dict:
    """Write a shard's marker, last: `summary` plus the bytes, rows and sha256 of each output (files
    beside the marker) that `check_marker` later holds them to."""
    summary = {**summary, "outputs": {path.name: part_record(path) for path in outputs}}
    write_atomic(marker, lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    return {**summary, "skipped": False}


class ShardMeter:
    """What one shard's work cost on this thread, from construction to `figures()`: wall seconds,
    model loads and their seconds, out-of-memory retries."""

    def __init__(self) -> None:
        self.start, self.loads = time.perf_counter(), thread_model_loads()
        self.load_seconds, self.oom_retries = thread_load_seconds(), thread_oom_retries()

    def figures(self) -> dict:
        return {"seconds": round(time.perf_counter() - self.start, 4), "model_loads": thread_model_loads() - self.loads,
                "load_seconds": round(thread_load_seconds() - self.load_seconds, 4),
                "oom_retries": thread_oom_retries() - self.oom_retries}


def run_marked(marker: Path, work: Callable[[], tuple[dict, list[Path]]], images_root: Path | None = None,
               made_from: str | None = None) -> dict:
    """The one shard runner, for every kind of shard: the marker when the shard is done and proves
    itself (made from `made_from`, when given); else `work()` (the summary and the output files it
    wrote beside the marker), measured by a `ShardMeter`, then the marker, recording the input."""
    if done := check_marker(marker, images_root=images_root, made_from=made_from)[0]:
        return done
    # Temporary files of a process killed mid-write: the shard is redone from scratch.
    for stale in marker.parent.glob(f".{marker.name.removesuffix('.done.json')}.*.tmp"):
        stale.unlink(missing_ok=True)
    meter = ShardMeter()
    summary, outputs = work()
    made = {} if made_from is None else {"input": made_from}
    return finish_marker(marker, {**summary, **made, **meter.figures()}, outputs)


def scores_path(folder: Path, shard: int) -> Path:
    """A shard's scores table (`Stage(scores=...)`) in its stage folder."""
    return folder / f"{shard_name(shard)}.scores.parquet"


def marker_path(spec: BuildSpec, stage: str, fp: str, shard: int) -> Path:
    return stage_dir(spec, stage, fp) / f"{shard_name(shard)}.done.json"


def check_shard(spec: BuildSpec, stage: str, fp: str, shard: int, verify: bool = False,
                expected_input: str | None = None) -> tuple[dict | None, str | None]:
    """`check_marker` for a build stage's shard, its images checked in the build's store; with
    `expected_input`, a marker made from another input (`shard_input`) is redone too."""
    return check_marker(marker_path(spec, stage, fp, shard), verify, build_dir(spec), f"{stage} shard {shard}", expected_input)


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
            rows = [{"index": i} for i in source_range(spec, shard)]
        else:
            rows = read_rows(upstream_dir / f"{shard_name(shard)}.parquet")
        context = StageContext(spec, stage, shard, source_root=ImageStore.of_stage_dir(upstream_dir).root if upstream_dir else None)
        kept = stage.process(rows, context)
        check_columns(stage, rows, kept)
        dropped = [
            {"id": d.row.get("id"), "index": d.row.get("index"), "stage": stage.name, "reason": d.reason, "detail": d.detail}
            for d in context.drops
        ]
        parts = {out_dir / f"{shard_name(shard)}.parquet": (kept, WORK), out_dir / f"{shard_name(shard)}.dropped.parquet": (dropped, DROPPED)}
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


# --- one build per output folder ------------------------------------------------------------------


LOCK_GRACE_SECONDS = 1.0


class BuildLocked(RuntimeError):
    """Another process is building into this output folder; the message names it."""


def lock_path(spec: BuildSpec) -> Path:
    return build_dir(spec) / ".build.lock"


def _build_lock(spec: BuildSpec) -> FileLock:
    path = lock_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The file stays, so a waiter never locks a deleted inode; the kernel frees the lock when its holder dies.
    return FileLock(path, thread_local=False, preserve_lock_file=True)


def lock_holder(spec: BuildSpec) -> str | None:
    """Who holds this build's lock now (None: nobody); the lock is tried and given straight back."""
    lock = _build_lock(spec)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return describe_holders([lock_path(spec)], time.time())
    lock.release()
    return None


def busy_message(spec: BuildSpec, holder: str) -> str:
    return f"{build_dir(spec)} is being built by another run ({holder}): wait for it, or pass --wait"


@contextmanager
def build_lock(spec: BuildSpec, holder: dict, wait: bool = False, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the build folder's lock for the body: with `wait`, wait for it; else raise `BuildLocked`
    naming the holder at once. `holder` (what, flow_run) is written beside the lock for the others."""
    lock = _build_lock(spec)
    try:
        # A second's grace: `lock_holder` (a `music build` checking first) holds it for microseconds.
        lock.acquire(timeout=LOCK_GRACE_SECONDS, poll_interval=0.05)
    except Timeout:
        who = describe_holders([lock_path(spec)], time.time())
        if not wait:
            raise BuildLocked(busy_message(spec, who)) from None
        if log:
            log(f"waiting for {build_dir(spec)}: {who}")
        lock.acquire()
    write_holder(lock_path(spec), {**holder, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    try:
        yield
    finally:
        lock.release()
