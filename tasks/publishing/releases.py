"""Releases: every publication (the training set's `dataset/`, the benchmark's `msic/`) whose data
differs from the current release becomes `<build>/releases/vN/`, with its parent, spec hash, code
version, model commits, time and status (`release.json`) and its diff against the parent
(`diff.json`). The published folder is the current release materialised by hard links.

- A release's files are hard links: a file whose bytes (sha256) some kept release already holds is
  linked to it, so a release that shares most shards with its parent costs only what changed.
- The release is decided by content (the sha256 of every sample's `content_hash`): an unchanged
  rebuild makes none, and a rerun of a killed or rejected publish finds the release it made.
- Quality gates (`release.gates` of the spec) decide whether a new release may become current; a
  rejected one is kept (`status: rejected`) and the published folder is not touched.
- Order of writes, each atomic: the release folder (renamed into place whole), then the published
  folder (built aside, then swapped). A kill at any point leaves the previous release current and
  intact; the rerun reuses the release folder it finds.

Status: `accepted` (passed its gates or promoted by hand) or `rejected`; which one is current is
the published folder's `release.json`, so it changes with the folder's swap and nowhere else."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_specs.build import QUANTILES, BuildSpec, GateParams, canonical_json
from safe_files import write_atomic
from tasks.engine.build_paths import recorded
from tasks.engine.contract import role_content, spec_values
from tasks.stages import STAGES

RECORD = "release.json"
DIFF = "diff.json"
DONE = "publish.done.json"
VERSION = re.compile(r"^v(\d+)$")


class ReleaseError(ValueError):
    """A release command that cannot be done (no such release, no parent to roll back to)."""


def releases_dir(folder: Path) -> Path:
    """A build publishes one kind of set (a training set or a benchmark), so its releases sit beside it."""
    return folder.parent / "releases"


def row_hash(row: dict) -> str:
    """The sha256 of a published row's content, each image (`{bytes, path}`) by its bytes' sha256."""
    def plain(value):
        if isinstance(value, dict) and isinstance(value.get("bytes"), bytes):
            return hashlib.sha256(value["bytes"]).hexdigest()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return hashlib.sha256(canonical_json(plain(row)).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# --- what a release holds ---------------------------------------------------------------------------


def read_samples(folder: Path, scores: tuple[str, ...]) -> dict:
    """Each sample's content hash, the subject-count mix and the values of each of `scores` (the
    published score columns, `BuildSpec.score_columns`) it has, from the published Parquet files'
    small columns (no image is read)."""
    hashes, counts, scores = {}, Counter(), {}
    for path in sorted((folder / "data").glob("*.parquet")):
        names = pq.read_schema(path).names
        key = "id" if "id" in names else "case_id"
        count = "num_subjects" if "num_subjects" in names else "subject_count"
        present = [c for c in scores if c in names]
        for row in pq.read_table(path, columns=[key, "content_hash", count, *present]).to_pylist():
            hashes[row[key]] = row["content_hash"]
            counts[row[count]] += 1
            for column in present:
                values = row[column] if isinstance(row[column], list) else [row[column]]
                scores.setdefault(column, []).extend(v for v in values if v is not None)
    return {"hashes": hashes, "subject_counts": {str(k): counts[k] for k in sorted(counts)}, "scores": scores}


def data_hash(hashes: dict[str, str]) -> str:
    return hashlib.sha256(canonical_json(sorted(hashes.items())).encode()).hexdigest()


def quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    points = np.quantile(np.asarray(values, np.float64), [int(q[1:]) / 100 for q in QUANTILES])
    return {q: round(float(v), 4) for q, v in zip(QUANTILES, points)}


def stage_inputs(spec: BuildSpec) -> dict[str, dict]:
    """What each stage's content depends on, as its fingerprint sees it (declared reads, role
    content) plus the model commits preflight recorded: the causes a diff names."""
    commits = {name: model.get("commit") for name, model in (recorded(spec) or {}).items()}
    inputs = {stage.name: {**spec_values(spec, stage.reads),
                           **{f"roles.{name}": {**role_content(spec.roles[name]), "commit": commits.get(name)} for name in stage.roles}}
              for stage in STAGES}
    inputs["publish"] = {**spec_values(spec, ("publish", "target", "msic")), "num_source_images": spec.num_source_images}
    return inputs


def keep_rates(result: dict) -> dict[str, float]:
    return {s["stage"]: round(s["rows_out"] / s["rows_in"], 4) if s["rows_in"] else 0.0 for s in result.get("funnel", [])}


def causes(before: dict, after: dict) -> list[str]:
    """One line per input that differs, by stage, in stage order."""
    lines = []
    for stage, values in after.items():
        old = before.get(stage, {})
        for name in sorted(set(values) | set(old)):
            if values.get(name) != old.get(name):
                lines.append(f"{stage}: {name} {json.dumps(old.get(name))} -> {json.dumps(values.get(name))}")
    return lines


def hash_changes(a: dict[str, str], b: dict[str, str]) -> dict[str, list[str]]:
    """Sample IDs added (in b only), removed (in a only) and changed (same ID, other content hash)."""
    return {"added": sorted(set(b) - set(a)), "removed": sorted(set(a) - set(b)),
            "changed": sorted(k for k in set(a) & set(b) if a[k] != b[k])}


def diff(parent: dict | None, parent_samples: dict | None, record: dict, samples: dict) -> dict:
    """Samples added, removed and changed (by content hash) from `parent` to `record` (release
    records with their `read_samples`), each kind with the causes known from the stages' inputs;
    per-stage keep rates, the subject-count mix and every score's quantiles before and after."""
    a = parent_samples["hashes"] if parent_samples else {}
    b = samples["hashes"]
    before_rates = keep_rates(parent["result"]) if parent else {}
    after_rates = keep_rates(record["result"])
    return {
        "from": parent["version"] if parent else None, "to": record["version"], "samples": [len(a), len(b)],
        **hash_changes(a, b),
        "causes": causes(parent["inputs"], record["inputs"]) if parent else [],
        "keep_rates": {stage: [before_rates.get(stage), rate] for stage, rate in after_rates.items()},
        "subject_counts": {"from": parent_samples["subject_counts"] if parent_samples else {}, "to": samples["subject_counts"]},
        "scores": {column: {"from": quantiles(parent_samples["scores"].get(column, [])) if parent_samples else None,
                            "to": quantiles(samples["scores"].get(column, []))}
                   for column in sorted(set(samples["scores"]) | set(parent_samples["scores"] if parent_samples else ()))},
    }


def changed_share(change: dict) -> float:
    moved = len(change["added"]) + len(change["removed"]) + len(change["changed"])
    return moved / max(change["samples"][0], 1)


def diff_lines(change: dict, limit: int = 20) -> list[str]:
    """The diff in lines of text: the counts, causes, keep rates, mix and quantiles (what the card,
    the CLI and the Prefect artifact show)."""
    lines = [f"{change['from'] or 'nothing'} -> {change['to']}: {change['samples'][0]} -> {change['samples'][1]} samples; "
             f"added {len(change['added'])}, removed {len(change['removed'])}, changed {len(change['changed'])}"]
    for kind in ("added", "removed", "changed"):
        ids = change[kind]
        if ids:
            lines.append(f"- {kind}: {', '.join(ids[:limit])}" + (f" and {len(ids) - limit} more" if len(ids) > limit else ""))
    lines += [f"- cause: {line}" for line in change["causes"]] or (["- cause: none recorded (same inputs)"] if change["from"] else [])
    for stage, (before, after) in change["keep_rates"].items():
        lines.append(f"- keep rate {stage}: {before if before is not None else '-'} -> {after}")
    lines.append(f"- subject counts: {change['subject_counts']['from'] or '-'} -> {change['subject_counts']['to']}")
    for column, pair in change["scores"].items():
        lines.append(f"- {column} quantiles ({'/'.join(QUANTILES)}): "
                     + " -> ".join("/".join(str(v) for v in q.values()) if q else "-" for q in (pair["from"], pair["to"])))
    return lines


# --- gates -------------------------------------------------------------------------------------------


def failed_gates(gates: GateParams, change: dict, target: int | None) -> list[str]:
    """One line per gate the new release fails (empty: it may become current)."""
    lines, samples = [], change["samples"][1]
    if gates.min_samples is not None:
        need = target if gates.min_samples == "target" else gates.min_samples
        if need is not None and samples < need:
            lines.append(f"gate min_samples: {samples} samples, fewer than {need}")
    if gates.keep_rate_distance is not None and change["from"]:
        for stage, (before, after) in change["keep_rates"].items():
            if before is not None and abs(after - before) > gates.keep_rate_distance:
                lines.append(f"gate keep_rate_distance: {stage} keeps {after:.3f}, the parent {before:.3f} "
                             f"(moved {abs(after - before):.3f} > {gates.keep_rate_distance})")
    for column, bounds in gates.score_bounds.items():
        points = change["scores"].get(column, {}).get("to") or {}
        for q, (low, high) in bounds.items():
            value = points.get(q)
            if value is None or (low is not None and value < low) or (high is not None and value > high):
                lines.append(f"gate score_bounds: {column} {q} is {value}, outside [{low}, {high}]")
    if gates.max_changed_share is not None and change["from"] and changed_share(change) > gates.max_changed_share:
        lines.append(f"gate max_changed_share: {changed_share(change):.3f} of the parent's samples added, removed or changed "
                     f"(> {gates.max_changed_share})")
    return lines


# --- the release folders -----------------------------------------------------------------------------


def read_record(release: Path) -> dict:
    return json.loads((release / RECORD).read_text())


def releases(folder: Path) -> list[dict]:
    """Every release of a published folder, oldest first."""
    root = releases_dir(folder)
    found = [p for p in root.iterdir() if VERSION.match(p.name) and (p / RECORD).is_file()] if root.is_dir() else []
    return [read_record(p) for p in sorted(found, key=lambda p: int(p.name[1:]))]


def current(folder: Path) -> dict | None:
    """The current release's record (the one the published folder holds), or None."""
    path = folder / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def release_path(folder: Path, version: str) -> Path:
    path = releases_dir(folder) / version
    if not VERSION.match(version) or not (path / RECORD).is_file():
        known = ", ".join(r["version"] for r in releases(folder)) or "none"
        raise ReleaseError(f"no release {version!r} under {releases_dir(folder)} (releases: {known})")
    return path


def _link_tree(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.name not in skip:
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target / path.relative_to(source))


def make_current(folder: Path, version: str, fingerprint: str | None = None, fresh: tuple[Path, dict] | None = None) -> dict:
    """Swap the published folder for release `version` materialised by hard links (built aside,
    then renamed), with its publish marker (`fingerprint`: the publish that asked for it; the
    release's own by default). `fresh`: (staging folder, result) of a publish whose data is this
    release's: its card, stats and other files replace the release's, the data files stay the
    release's. Returns the result."""
    release = release_path(folder, version)
    record = read_record(release)
    new = folder.with_name(f".{folder.name}-new-{os.getpid()}")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    _link_tree(release, new)
    if fresh:
        for path in sorted(p for p in fresh[0].rglob("*") if p.is_file() and p.relative_to(fresh[0]).parts[0] != "data"):
            (new / path.relative_to(fresh[0])).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, new / path.relative_to(fresh[0]))
    result = {**(fresh[1] if fresh else record["result"]), "release": summary(record)}
    (new / DONE).write_text(json.dumps({"fingerprint": fingerprint or record["fingerprint"], "result": result}, indent=1) + "\n")
    old = folder.with_name(f".{folder.name}-old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)
    return result


def summary(record: dict) -> dict:
    """What a run's result says of its release (the events, the flow's return value)."""
    return {"version": record["version"], "parent": record["parent"], "status": record["status"],
            "samples": record["samples"], "failed_gates": record["failed_gates"], "diff": record.get("diff_counts")}


def settle(folder: Path, record: dict, fingerprint: str, gates: GateParams, target: int | None,
           fresh: tuple[Path, dict] | None = None) -> dict:
    """An existing release asked for again: an accepted one is made current; a rejected one is
    judged again by today's gates on its recorded diff (loosened gates accept it), else stays rejected."""
    if record["status"] == "rejected":
        change = json.loads((releases_dir(folder) / record["version"] / DIFF).read_text())
        if failed := failed_gates(gates, change, target):
            return {**record["result"], "release": summary(record | {"failed_gates": failed})}
        record |= {"status": "accepted", "failed_gates": []}
        write_atomic(releases_dir(folder) / record["version"] / RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    return make_current(folder, record["version"], fingerprint, fresh)


def reuse(folder: Path, fingerprint: str, gates: GateParams, target: int | None) -> dict | None:
    """The result of the release an earlier publish with this fingerprint made (a rerun after a
    kill, a rollback or a rejection; `settle`), or None when there is none."""
    for record in reversed(releases(folder)):
        if record["fingerprint"] == fingerprint:
            return settle(folder, record, fingerprint, gates, target)
    return None


def commit(folder: Path, staging: Path, fingerprint: str, result: dict, meta: dict, gates: GateParams,
           target: int | None, scores: tuple[str, ...]) -> dict:
    """Make the candidate in `staging` (a filled publication folder) a release, or find the one
    its data already is; make it current when it passes its gates. `meta`: spec_hash,
    code_version, models and inputs (`stage_inputs`); `scores`: the score columns the diff and the gates
    read. Returns the result with its release."""
    root = releases_dir(folder)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".v*"):  # a release folder a killed run did not finish (one build per folder runs)
        shutil.rmtree(leftover, ignore_errors=True)
    samples = read_samples(staging, scores)
    content = data_hash(samples["hashes"])
    known = releases(folder)
    same = next((r for r in reversed(known) if r["data_hash"] == content), None)
    if same is not None:  # unchanged data: no new release; the published folder gets this publish's card and stats
        try:
            return settle(folder, same, fingerprint, gates, target, (staging, result))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    parent = current(folder)
    version = f"v{max((int(r['version'][1:]) for r in known), default=0) + 1}"
    record = {"version": version, "parent": parent["version"] if parent else None, "kind": folder.name,
              "data_hash": content, "fingerprint": fingerprint, **meta,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "samples": len(samples["hashes"]), "result": result}
    parent_samples = read_samples(releases_dir(folder) / parent["version"], scores) if parent else None
    change = diff(parent, parent_samples, record, samples)
    failed = failed_gates(gates, change, target)
    record |= {"status": "rejected" if failed else "accepted", "failed_gates": failed,
               "diff_counts": {k: len(change[k]) for k in ("added", "removed", "changed")}}
    card = staging / "README.md"
    if card.is_file() and parent:
        card.write_text(card.read_text() + f"\n## Changes since {parent['version']}\n\n" + "\n".join(diff_lines(change)) + "\n")
    # 1. The release folder, whole: each file linked to a kept release's file of the same bytes.
    by_sha = {sha: root / r["version"] / name for r in known for name, sha in r.get("files", {}).items()}
    building = root / f".{version}-{os.getpid()}"
    building.mkdir()
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        name = path.relative_to(staging).as_posix()
        files[name] = sha = file_sha256(path)
        (building / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(by_sha[sha] if sha in by_sha and by_sha[sha].exists() else path, building / name)
    record["files"] = files
    (building / DIFF).write_text(json.dumps(change, indent=1) + "\n")
    (building / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    os.replace(building, root / version)
    shutil.rmtree(staging, ignore_errors=True)
    # 2. The published folder, swapped whole, only for a release that passed its gates.
    if failed:
        return {**result, "release": summary(record)}
    return make_current(folder, version, fingerprint)


def diff_between(folder: Path, scores: tuple[str, ...], a: str | None = None, b: str | None = None) -> dict:
    """The diff of release `b` (default: the current) against `a` (default: b's parent), over the
    score columns `scores`."""
    now = current(folder)
    b = b or (now["version"] if now else None)
    if b is None:
        raise ReleaseError(f"{folder} has no current release")
    record_b = read_record(release_path(folder, b))
    a = a or record_b["parent"]
    if a is None:
        raise ReleaseError(f"release {b} has no parent: name the release to compare it with")
    record_a = read_record(release_path(folder, a))
    return diff(record_a, read_samples(release_path(folder, a), scores), record_b, read_samples(release_path(folder, b), scores))


def promote(folder: Path, version: str) -> dict:
    """Accept release `version` by hand (a rejected candidate) and make it current."""
    release = release_path(folder, version)
    record = read_record(release)
    if record["status"] != "accepted":
        record |= {"status": "accepted", "promoted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_atomic(release / RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    return make_current(folder, version)


def rollback(folder: Path) -> dict:
    """Make the current release's parent current again."""
    now = current(folder)
    if now is None or now["parent"] is None:
        raise ReleaseError(f"{folder}: " + ("no current release" if now is None else f"the current release {now['version']} has no parent"))
    return make_current(folder, now["parent"])


def unkept(folder: Path, keep: int) -> list[Path]:
    """Release folders beyond the newest `keep` (never the current one)."""
    now = current(folder)
    old = [r["version"] for r in releases(folder)][:-keep] if keep else []
    return [releases_dir(folder) / v for v in old if not now or v != now["version"]]
