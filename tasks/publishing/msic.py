"""The MSIC benchmark: cases drawn from the pipeline's decimated samples after near-duplicate
sources are removed, stratified by subject count, published with a versioned manifest of content
hashes and a preview, and checked against a training set for contamination two ways:

- exact: a source image, caption or reference with the same content hash as one in the training set;
- near-duplicate: a benchmark target or reference whose CLIP and DINO embeddings are both at least
  `msic.overlap_clip` / `msic.overlap_dino` similar to a training target or reference (a re-encoded,
  resized or lightly edited copy). Similarities are cosines of embeddings centred on the mean of
  both sets: a checkpoint's image embeddings share a common direction (the "cone effect"; for the
  tiny random zoo nearly all of it, so any two noise images score ~0.999 raw) that raw cosine counts
  as likeness; centring removes it, and a copy still scores ~1.

The CLIP-T `prompt` of a case is the instruction with each `<sN>` tag replaced by its category,
cut at a word boundary to what CLIP's text encoder reads (77 tokens with its start and end tokens,
counted with the build's CLIP tokenizer), so the stored text is exactly the text scored;
`prompt_cut` records a cut.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_specs.build import BuildSpec, MsicParams, canonical_json
from data_specs.schemas import DROPPED, IMAGE, with_features
from music_model.media.images import from_struct
from music_model.roles import load_role
from music_model.subjects.decimate import SUBJECT_TOKEN
from music_model.subjects.preview import from_case, render_sheet
from safe_files import write_atomic
from tasks.engine.build_paths import build_dir, stage_dir
from tasks.engine.contract import read_rows, role_content, stable_int, write_table
from tasks.engine.image_store import ImageStore
from tasks.publishing.publish import code_version, drop_near_duplicates, preview_ids, preview_markdown, publish_folder, published_result, read_filter_index, stream_rows, write_sheets, yaml_header
from tasks.publishing.releases import hash_changes, row_hash

BENCHMARK_CASES = pa.schema([
    ("case_id", pa.string()), ("subject_count", pa.int32()), ("instruction", pa.string()),
    ("prompt", pa.string()), ("prompt_cut", pa.bool_()), ("categories", pa.list_(pa.string())),
    ("references", pa.list_(IMAGE)), ("boxes", pa.list_(pa.list_(pa.float32()))),
    ("target", IMAGE), ("layout", pa.list_(pa.int32())), ("layout_text", pa.string()),
    ("cot", pa.string()), ("caption", pa.string()), ("sample_id", pa.string()), ("source_id", pa.string()),
    ("content_hash", pa.string()),  # tasks.publishing.msic.case_hash: what the manifest and a release diff compare
])
BENCHMARK_CASES_FEATURES = {
    "case_id": {"dtype": "string", "_type": "Value"}, "subject_count": {"dtype": "int32", "_type": "Value"},
    "instruction": {"dtype": "string", "_type": "Value"}, "prompt": {"dtype": "string", "_type": "Value"},
    "prompt_cut": {"dtype": "bool", "_type": "Value"},
    "categories": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"},
    "references": {"feature": {"_type": "Image"}, "_type": "List"},
    "boxes": {"feature": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "List"}, "_type": "List"},
    "target": {"_type": "Image"},
    "layout": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
    "layout_text": {"dtype": "string", "_type": "Value"}, "cot": {"dtype": "string", "_type": "Value"},
    "caption": {"dtype": "string", "_type": "Value"}, "sample_id": {"dtype": "string", "_type": "Value"},
    "source_id": {"dtype": "string", "_type": "Value"}, "content_hash": {"dtype": "string", "_type": "Value"},
}
EMBED_CHUNK = 256  # images decoded and embedded at a time: a 10k-sample training set never sits in memory decoded


class OverlapError(RuntimeError):
    """A benchmark case shares content with the training set."""


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


# --- the CLIP-T prompt ----------------------------------------------------------------------------


_NAME_TWICE = re.compile(r"\b([^\W\d_][\w'\- ]*?) \(\1\)")


def clip_t_prompt(instruction: str, categories: list[str]) -> str:
    """The instruction with each `<sN>` tag replaced by its category, and a name followed by itself
    in brackets written once (annotate's repair writes `<s1> (dog)`; decimation turns a dropped
    subject's tag into its name)."""
    named = SUBJECT_TOKEN.sub(lambda m: categories[int(m.group(1)) - 1] if 1 <= int(m.group(1)) <= len(categories) else m.group(0),
                              instruction)
    return _NAME_TWICE.sub(r"\1", named)


def clip_text_budget(clip) -> tuple[Callable[[str], int], int]:
    """How many tokens the clip role's text encoder reads for a text (start and end tokens
    included), and how many it can read."""
    tokenizer = clip.tokenizer
    if hasattr(tokenizer, "model_max_length"):  # transformers: input_ids carry the start and end tokens
        return (lambda text: len(tokenizer(text, verbose=False).input_ids)), clip.context_length
    if hasattr(tokenizer, "encode") and getattr(tokenizer, "context_length", None):  # open_clip's SimpleTokenizer
        return (lambda text: len(tokenizer.encode(text)) + 2), tokenizer.context_length
    raise ValueError(f"roles.clip: cannot count the tokens of {type(tokenizer).__name__}; "
                     "build the benchmark with a transformers or open_clip CLIP tokenizer")


def fit_clip_context(text: str, count: Callable[[str], int], limit: int) -> tuple[str, bool]:
    """`text`, or its longest word prefix that `count` puts within `limit` tokens (a first word that
    alone does not fit is cut by characters); and whether it was cut. CLIP tokenizes word by word,
    so the count grows with the prefix and a binary search finds the cut."""
    if count(text) <= limit:
        return text, False
    words = text.split()

    def longest(candidates: list[str]) -> int:
        low, high = 0, len(candidates)
        while low < high:
            middle = (low + high + 1) // 2
            if count(candidates[middle - 1]) <= limit:
                low = middle
            else:
                high = middle - 1
        return low

    prefixes = [" ".join(words[:k]) for k in range(1, len(words) + 1)]
    fits = longest(prefixes)
    if fits:
        return prefixes[fits - 1], True
    return words[0][: longest([words[0][:k] for k in range(1, len(words[0]) + 1)])], True


# --- cases ----------------------------------------------------------------------------------------


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


def to_case(spec: BuildSpec, row: dict, fit: Callable[[str], tuple[str, bool]]) -> dict:
    categories = [s["category"] for s in row["subjects"]]
    prompt, cut = fit(clip_t_prompt(row["instruction"], categories))
    case = {
        "case_id": f"msic-{spec.msic.version}-{row['num_subjects']:02d}-{sha(row['id'])[:10]}",
        "subject_count": row["num_subjects"], "instruction": row["instruction"], "prompt": prompt, "prompt_cut": cut,
        "categories": categories, "references": [s["reference"] for s in row["subjects"]],
        "boxes": [s["box"] for s in row["subjects"]], "target": row["image"], "layout": row["layout"],
        "layout_text": row["layout_text"], "cot": row["cot"], "caption": row["caption"], "sample_id": row["id"],
        "source_id": row["source_id"],
    }
    return {**case, "content_hash": case_hash(case)}


def case_hash(case: dict) -> str:
    """The content hash of a case: its texts, layout and the bytes of every image."""
    return row_hash({k: v for k, v in case.items() if k != "content_hash"})


def read_benchmark_cases(msic: Path) -> list[dict]:
    """Every case of a published MSIC folder."""
    files = sorted((msic / "data").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no published cases under {msic / 'data'}")
    return [row for path in files for row in read_rows(path)]


# --- contamination: exact ---------------------------------------------------------------------------


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def _training_files(dataset: Path) -> list[Path]:
    files = sorted((dataset / "data").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no published Parquet under {dataset / 'data'}")
    return files


def training_hashes(dataset: Path) -> dict[str, dict[str, str]]:
    """Content hashes of a published training set: kind -> hash -> the sample that has it."""
    found: dict[str, dict[str, str]] = {"source image": {}, "caption": {}, "reference": {}}
    for path in _training_files(dataset):
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


# --- contamination: near-duplicates by embedding ----------------------------------------------------


def _embed_distinct(batches: Iterable[list[tuple[dict, str]]], roles: tuple) -> tuple[list[np.ndarray], list[list[str]]]:
    """Embeddings by each role of the distinct images in `batches` of (image struct, holder), and
    the holders of each (decimated siblings share their images). Batch by batch, so a large
    training set is never in memory whole."""
    seen: dict[str, int] = {}
    holders: list[list[str]] = []
    embedded: list[list[np.ndarray]] = [[] for _ in roles]
    for batch in batches:
        fresh = []
        for struct, holder in batch:
            digest = sha(struct["bytes"])
            if digest not in seen:
                seen[digest] = len(holders)
                holders.append([])
                fresh.append(struct)
            if holder not in holders[seen[digest]]:
                holders[seen[digest]].append(holder)
        for start in range(0, len(fresh), EMBED_CHUNK):
            images = [from_struct(s) for s in fresh[start:start + EMBED_CHUNK]]
            for out, role in zip(embedded, roles):
                with role.lock:
                    out.append(role.embed_images(images))
    return [np.concatenate(chunks) for chunks in embedded] if holders else [], holders


def centred(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets minus the mean of both, each row back to unit length (a zero row stays zero)."""
    mean = np.concatenate([a, b]).mean(0)

    def unit(x: np.ndarray) -> np.ndarray:
        x = x - mean
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return unit(a), unit(b)


def _training_items(dataset: Path, kind: str) -> Iterable[list[tuple[dict, str]]]:
    """One batch per Parquet file of (image, "sample (what)") for targets or references."""
    for path in _training_files(dataset):
        if kind == "target":
            rows = pq.read_table(path, columns=["id", "image"]).to_pylist()
            yield [(r["image"], f"{r['id']} (target)") for r in rows]
        else:
            rows = pq.read_table(path, columns=["id", "references"]).to_pylist()
            yield [(ref, f"{r['id']} (reference {k + 1})") for r in rows for k, ref in enumerate(r["references"])]


def near_duplicates(cases: list[dict], dataset: Path, clip, dino, params: MsicParams) -> tuple[list[str], dict]:
    """One line per benchmark target or reference that nearly duplicates a training image of the
    same kind (centred CLIP >= overlap_clip and centred DINO >= overlap_dino for one training
    image), naming the case, the training sample and both similarities; and per kind what was
    compared and the highest similarities seen (how far the clean pairs are from the thresholds)."""
    lines, stats = [], {}
    for kind in ("target", "reference"):
        if kind == "target":
            ours = [(c["target"], f"{c['case_id']}: target") for c in cases]
        else:
            ours = [(ref, f"{c['case_id']}: reference {k + 1}") for c in cases for k, ref in enumerate(c["references"])]
        query, query_holders = _embed_distinct([ours], (clip, dino))
        gallery, gallery_holders = _embed_distinct(_training_items(dataset, kind), (clip, dino))
        stats[kind] = {"benchmark_images": len(query_holders), "training_images": len(gallery_holders),
                       "max_clip": None, "max_dino": None}
        if not query or not gallery:
            continue
        (q_clip, g_clip), (q_dino, g_dino) = centred(query[0], gallery[0]), centred(query[1], gallery[1])
        max_clip = max_dino = -1.0
        for start in range(0, len(q_clip), EMBED_CHUNK):
            s_clip = q_clip[start:start + EMBED_CHUNK] @ g_clip.T
            s_dino = q_dino[start:start + EMBED_CHUNK] @ g_dino.T
            max_clip, max_dino = max(max_clip, float(s_clip.max())), max(max_dino, float(s_dino.max()))
            hit = (s_clip >= params.overlap_clip) & (s_dino >= params.overlap_dino)
            for row in np.flatnonzero(hit.any(1)):
                best = int(np.argmax(np.where(hit[row], s_dino[row], -np.inf)))
                for holder in query_holders[start + row]:
                    lines.append(f"{holder} near-duplicates training sample {gallery_holders[best][0]}: "
                                 f"CLIP {s_clip[row, best]:.4f}, DINO {s_dino[row, best]:.4f}")
        stats[kind] |= {"max_clip": round(max_clip, 4), "max_dino": round(max_dino, 4)}
    return sorted(lines), stats


def embedders(spec: BuildSpec) -> tuple:
    """The spec's clip and dino roles: the near-duplicate check embeds with the build's own models."""
    return load_role(spec.roles["clip"]), load_role(spec.roles["dino"])


def check_overlap(cases: list[dict], training_dataset: Path, roles: tuple | None = None,
                  params: MsicParams | None = None) -> dict:
    """Raise OverlapError naming every exact overlap and (with `roles` = (clip, dino)) every
    near-duplicate; otherwise return what was checked and the closest similarities seen."""
    found = overlaps(cases, training_hashes(training_dataset))
    report: dict = {"training_dataset": str(training_dataset), "exact": len(found)}
    if roles is not None:
        params = params or MsicParams()
        near, stats = near_duplicates(cases, training_dataset, *roles, params)
        found += near
        report |= {"near_duplicates": len(near), "thresholds": {"clip": params.overlap_clip, "dino": params.overlap_dino},
                   "compared": stats}
    if found:
        raise OverlapError(f"{len(found)} benchmark item(s) overlap the training set {training_dataset}:\n" + "\n".join(found))
    return report


def _check_text(check: dict | None) -> str:
    if check is None:
        return "- contamination check: none (no `msic.training_dataset`)\n"
    text = f"- contamination check against `{check['training_dataset']}`: no exact overlap (content hashes)"
    if "compared" in check:
        closest = "; ".join(f"{kind}s: {s['benchmark_images']} against {s['training_images']}, highest CLIP {s['max_clip']}, "
                            f"DINO {s['max_dino']}" for kind, s in check["compared"].items())
        text += (f", no near-duplicate (centred CLIP >= {check['thresholds']['clip']} and DINO >= "
                 f"{check['thresholds']['dino']}; {closest})")
    return text + "\n"


# --- publish --------------------------------------------------------------------------------------


def msic_fingerprint(spec: BuildSpec, upstream: str, shards: int) -> str:
    """What the published benchmark depends on: the msic section, the near-duplicate threshold, the
    filter stage's fingerprint and shard count, the embedders of the overlap check and the training
    set it checks (each data file's name, size and modification time: a rewritten set is checked again)."""
    training = Path(spec.msic.training_dataset).expanduser() if spec.msic.training_dataset else None
    files = [(p.relative_to(training).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in _training_files(training)] if training else None
    payload = {"msic": spec.msic.model_dump(mode="json"), "near_duplicate": spec.filter.near_duplicate_clip, "upstream": upstream, "shards": shards,
               "roles": {name: role_content(spec.roles[name]) for name in ("clip", "dino")}, "training": files}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def gate_target(spec: BuildSpec) -> int:
    """The case count the `min_samples: target` gate asks of the benchmark: every stratum full."""
    return len(spec.msic.strata) * spec.msic.cases_per_stratum


def published_msic(spec: BuildSpec, fingerprint: str) -> dict | None:
    """The result of the benchmark published with this fingerprint, or None (publish it)."""
    folder = build_dir(spec) / "msic"
    result = published_result(folder, fingerprint, spec, gate_target(spec))
    if result is None:
        return None
    return {**result, "msic": str(folder.resolve()), "counts": {int(k): v for k, v in result["counts"].items()}, "skipped": True}


def publish_msic(spec: BuildSpec, filter_dir: Path, shards: int, fingerprint: str) -> dict:
    """Drop near-duplicate sources, select, check and publish the benchmark: cases Parquet,
    manifest.json, a card and preview sheets (whether this fingerprint is already published is the
    caller's question: `published_msic`, asked by the MSIC flow's `publish_once`). Near-duplicate
    drops go to `stages/publish-msic/<fingerprint>/dropped.parquet`."""
    # Selection reads the rows without their images; only the chosen cases' images are read.
    index = read_filter_index(filter_dir, shards)
    kept, dropped, duplicates = drop_near_duplicates(spec, index, "publish-msic")
    write_table(dropped, DROPPED, stage_dir(spec, "publish-msic", fingerprint) / "dropped.parquet")
    chosen = sorted((r["id"] for r in select_cases(spec, kept)), key=lambda i: (index.shard_of[i], i))
    clip = load_role(spec.roles["clip"])
    count, limit = clip_text_budget(clip)
    cases = sorted((to_case(spec, r, lambda text: fit_clip_context(text, count, limit)) for r in stream_rows(filter_dir, index, chosen, ImageStore.of_stage_dir(filter_dir))),
                   key=lambda c: c["case_id"])
    check = None
    if spec.msic.training_dataset:
        check = check_overlap(cases, Path(spec.msic.training_dataset).expanduser(), embedders(spec), spec.msic)
    counts = {k: sum(c["subject_count"] == k for c in cases) for k in spec.msic.strata}
    cut = sum(c["prompt_cut"] for c in cases)
    manifest = {"name": spec.name, "version": spec.msic.version, "spec_hash": spec.spec_hash(), "code_version": code_version(),
                "counts": {str(k): v for k, v in counts.items()}, "cases": {c["case_id"]: c["content_hash"] for c in cases}}

    def write(staging: Path) -> dict:
        table = pa.Table.from_pylist(cases, schema=with_features(BENCHMARK_CASES, BENCHMARK_CASES_FEATURES))
        write_atomic(staging / "data" / "test-00000-of-00001.parquet", lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        by_id = {c["case_id"]: c for c in cases}
        sheets = [(i, render_sheet(from_case(by_id[i]))) for i in preview_ids(spec.seed, list(by_id))]
        previews = [p.relative_to(staging).as_posix() for p in write_sheets(staging / "preview", sheets)]
        header = {"pretty_name": f"MSIC benchmark {spec.msic.version} ({spec.name})",
                  "configs": [{"config_name": "default", "data_files": [{"split": "test", "path": "data/test-*.parquet"}]}]}
        short = {k: v for k, v in counts.items() if v < spec.msic.cases_per_stratum}
        (staging / "README.md").write_text(
            f"{yaml_header(header)}# MSIC benchmark {spec.msic.version}: {spec.name}\n\n"
            "Multi-subject in-context generation cases (1-12 subjects) regenerated by the MUSIC pipeline by the paper's "
            "recipe: the paper's own MSIC set was curated and never released, so scores on this set are not the "
            "paper's MSIC scores (`docs/FIDELITY.md` of the pipeline's repository says what differs). Each case: instruction "
            "(subjects as `<sN>` tags), `prompt` for CLIP-T (tags replaced by categories, cut at a word boundary to CLIP's "
            "77-token context; `prompt_cut` marks a cut), reference images with categories and boxes, the pipeline's target "
            "image (an upper-bound reference), layout and CoT.\n\n"
            f"- cases: {len(cases)}; per subject count: {counts}\n"
            + (f"- strata short of {spec.msic.cases_per_stratum} cases: {short}\n" if short else "")
            + f"- near-duplicate sources removed before selection (CLIP >= {spec.filter.near_duplicate_clip}): {duplicates}\n"
            f"- CLIP-T prompts cut to fit 77 tokens: {cut} of {len(cases)}\n"
            f"- spec hash: `{manifest['spec_hash']}`; code version: `{manifest['code_version']}`\n"
            + _check_text(check)
            + ("\n" + "\n".join(preview_markdown(staging, previews)) if previews else "")
        )
        return {"cases": len(cases), "counts": counts, "near_duplicate_sources": duplicates, "prompts_cut": cut,
                "contamination": check, "preview": previews}

    folder = build_dir(spec) / "msic"
    result = publish_folder(folder, fingerprint, write, spec, gate_target(spec))
    return {**result, "msic": str(folder.resolve()), "skipped": False}


def diff_manifests(a: dict, b: dict) -> dict[str, list[str]]:
    """Cases added (in b only), removed (in a only) and changed (same ID, other content hash)."""
    return hash_changes(a["cases"], b["cases"])
