"""The MSIC benchmark: cases drawn from the pipeline's decimated samples, stratified by subject
count, published with a versioned manifest of content hashes and checked against a training set
for overlap (source image, caption, reference images, by content hash)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from data_specs.build import BuildSpec, canonical_json
from data_specs.schemas import IMAGE
from music_model.decimate import SUBJECT_TOKEN
from tasks.engine import build_dir, read_rows, shard_name, stable_int, write_atomic
from tasks.publish import code_version

CASES = pa.schema([
    ("case_id", pa.string()), ("subject_count", pa.int32()), ("instruction", pa.string()),
    ("prompt", pa.string()), ("categories", pa.list_(pa.string())), ("references", pa.list_(IMAGE)),
    ("target", IMAGE), ("layout", pa.list_(pa.int32())), ("layout_text", pa.string()),
    ("cot", pa.string()), ("caption", pa.string()), ("sample_id", pa.string()), ("source_id", pa.string()),
])
CASES_FEATURES = {
    "case_id": {"dtype": "string", "_type": "Value"}, "subject_count": {"dtype": "int32", "_type": "Value"},
    "instruction": {"dtype": "string", "_type": "Value"}, "prompt": {"dtype": "string", "_type": "Value"},
    "categories": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"},
    "references": {"feature": {"_type": "Image"}, "_type": "List"}, "target": {"_type": "Image"},
    "layout": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
    "layout_text": {"dtype": "string", "_type": "Value"}, "cot": {"dtype": "string", "_type": "Value"},
    "caption": {"dtype": "string", "_type": "Value"}, "sample_id": {"dtype": "string", "_type": "Value"},
    "source_id": {"dtype": "string", "_type": "Value"},
}


class OverlapError(RuntimeError):
    """A benchmark case shares content with the training set."""


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def clip_t_prompt(instruction: str, categories: list[str]) -> str:
    """The instruction with each `<sN>` tag replaced by its category: what CLIP-T scores against."""
    return SUBJECT_TOKEN.sub(lambda m: categories[int(m.group(1)) - 1] if int(m.group(1)) <= len(categories) else m.group(0),
                             instruction)


def select_cases(spec: BuildSpec, rows: list[dict]) -> list[dict]:
    """`cases_per_stratum` samples per subject count, in a seeded order that prefers sources not
    used yet, so a stratum draws on as many different images as it can."""
    params = spec.msic
    used: set[str] = set()
    chosen = []
    for count in params.strata:
        pool = sorted((r for r in rows if r["num_subjects"] == count), key=lambda r: stable_int(spec.seed, r["id"], "msic"))
        fresh = [r for r in pool if r["source_id"] not in used]
        picked = (fresh + [r for r in pool if r["source_id"] in used])[: params.cases_per_stratum]
        used.update(r["source_id"] for r in picked)
        chosen.extend(picked)
    return chosen


def to_case(spec: BuildSpec, row: dict) -> dict:
    categories = [s["category"] for s in row["subjects"]]
    return {
        "case_id": f"msic-{spec.msic.version}-{row['num_subjects']:02d}-{sha(row['id'])[:10]}",
        "subject_count": row["num_subjects"], "instruction": row["instruction"],
        "prompt": clip_t_prompt(row["instruction"], categories), "categories": categories,
        "references": [s["reference"] for s in row["subjects"]], "target": row["image"], "layout": row["layout"],
        "layout_text": row["layout_text"], "cot": row["cot"], "caption": row["caption"], "sample_id": row["id"],
        "source_id": row["source_id"],
    }


def case_hash(case: dict) -> str:
    """The content hash of a case: its texts, layout and the bytes of every image."""
    content = {k: v for k, v in case.items() if k not in ("references", "target")}
    content["references"] = [sha(r["bytes"]) for r in case["references"]]
    content["target"] = sha(case["target"]["bytes"])
    return sha(canonical_json(content))


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def training_hashes(dataset: Path) -> dict[str, dict[str, str]]:
    """Content hashes of a published training set: kind -> hash -> the sample that has it."""
    files = sorted((dataset / "data").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no published Parquet under {dataset / 'data'}")
    found: dict[str, dict[str, str]] = {"source image": {}, "caption": {}, "reference": {}}
    for path in files:
        for row in pq.read_table(path, columns=["id", "image", "caption", "references"]).to_pylist():
            found["source image"].setdefault(sha(row["image"]["bytes"]), row["id"])
            found["caption"].setdefault(sha(normalised(row["caption"])), row["id"])
            for reference in row["references"]:
                found["reference"].setdefault(sha(reference["bytes"]), row["id"])
    return found


def overlaps(cases: list[dict], training: dict[str, dict[str, str]]) -> list[str]:
    """One line per benchmark item whose content hash is in the training set."""
    lines = []
    for case in cases:
        checks = [("source image", sha(case["target"]["bytes"])), ("caption", sha(normalised(case["caption"])))]
        checks += [("reference", sha(r["bytes"])) for r in case["references"]]
        for kind, digest in checks:
            if digest in training[kind]:
                lines.append(f"{case['case_id']}: {kind} {digest[:12]} also in training sample {training[kind][digest]}")
    return sorted(set(lines))


def check_overlap(cases: list[dict], training_dataset: Path) -> None:
    found = overlaps(cases, training_hashes(training_dataset))
    if found:
        raise OverlapError(f"{len(found)} benchmark item(s) overlap the training set {training_dataset}:\n" + "\n".join(found))


def publish_msic(spec: BuildSpec, filter_dir: Path, shards: int) -> dict:
    """Select, check and publish the benchmark: cases Parquet, manifest.json and a card."""
    rows = [r for k in range(shards) for r in read_rows(filter_dir / f"{shard_name(k)}.parquet")]
    cases = sorted((to_case(spec, r) for r in select_cases(spec, rows)), key=lambda c: c["case_id"])
    if spec.msic.training_dataset:
        check_overlap(cases, Path(spec.msic.training_dataset).expanduser())
    counts = {k: sum(c["subject_count"] == k for c in cases) for k in spec.msic.strata}
    manifest = {"name": spec.name, "version": spec.msic.version, "spec_hash": spec.spec_hash(), "code_version": code_version(),
                "counts": {str(k): v for k, v in counts.items()}, "cases": {c["case_id"]: case_hash(c) for c in cases}}
    out = build_dir(spec) / "msic"
    staging = build_dir(spec) / f".msic-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    schema = CASES.with_metadata({"huggingface": json.dumps({"info": {"features": CASES_FEATURES}})})
    table = pa.Table.from_pylist(cases, schema=schema)
    write_atomic(staging / "data" / "test-00000-of-00001.parquet", lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    header = {"pretty_name": f"MSIC benchmark {spec.msic.version} ({spec.name})",
              "configs": [{"config_name": "default", "data_files": [{"split": "test", "path": "data/test-*.parquet"}]}]}
    short = {k: v for k, v in counts.items() if v < spec.msic.cases_per_stratum}
    (staging / "README.md").write_text(
        f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n# MSIC benchmark {spec.msic.version}: {spec.name}\n\n"
        "Multi-subject in-context generation cases (1-12 subjects) regenerated by the MUSIC pipeline. Each case: "
        "instruction (subjects as `<sN>` tags), `prompt` for CLIP-T (tags replaced by categories), reference images "
        "with categories, the pipeline's target image (an upper-bound reference), layout and CoT.\n\n"
        f"- cases: {len(cases)}; per subject count: {counts}\n"
        + (f"- strata short of {spec.msic.cases_per_stratum} cases: {short}\n" if short else "")
        + f"- spec hash: `{manifest['spec_hash']}`; code version: `{manifest['code_version']}`\n"
        f"- overlap check against: {spec.msic.training_dataset or 'none given'}\n"
    )
    old = build_dir(spec) / f".msic-old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    return {"msic": str(out.resolve()), "cases": len(cases), "counts": counts}


def diff_manifests(a: dict, b: dict) -> dict[str, list[str]]:
    """Cases added (in b only), removed (in a only) and changed (same ID, other content hash)."""
    ca, cb = a["cases"], b["cases"]
    return {"added": sorted(set(cb) - set(ca)), "removed": sorted(set(ca) - set(cb)),
            "changed": sorted(k for k in set(ca) & set(cb) if ca[k] != cb[k])}
