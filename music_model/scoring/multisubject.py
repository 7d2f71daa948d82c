"""Multi-subject (MSIC-style) scoring over generic cases: (instruction, CLIP-T text, reference images
with categories, one or more generated candidates), read from a Parquet table with the
`data_specs.eval.CASES` schema, so the MSIC benchmark or any user's cases feed the same scorer.

Two scores per generated image:

- **UNO-style** (the definition multi-subject papers report): each reference against the whole
  generated image (DINO, CLIP-I), mean over subjects; CLIP-T of the image against the text.
- **Grounded**: the detector looks for each subject's category in the image; the boxes of a
  category are matched one-to-one to that category's subjects (greedily by DINO similarity, best
  pair first), and each subject's crop is scored against its own reference. A subject with no box
  is *missing*: it scores `MISSING_SCORE` (0) in the grounded mean, and the missing rate and the
  worst subject are reported beside the mean, which alone would hide it.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_specs.eval import CASE_METRICS, CASES, GroundingParams
from music_model.media.images import crop
from music_model.scoring.metrics import Scorer, UnreadableImage, bootstrap_estimate, cosine_matrix, decode_image, rowwise_cosine

MISSING_SCORE = 0.0


class CasesError(ValueError):
    """A cases table that cannot be scored at all; raised before any model work."""


@dataclass
class Case:
    case_id: str
    instruction: str
    prompt: str
    categories: list[str]
    references: list[Image.Image]
    reference_keys: list[str]  # content hashes: a reference shared by cases is embedded once
    candidates: list[Image.Image]
    candidate_index: list[int]  # each kept candidate's position in the case's `generated` list


def read_cases_table(path: str | Path) -> pa.Table:
    """The cases table, checked as a whole: the file, its columns and types, unique non-empty IDs."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CasesError(f"cases file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise CasesError(f"{path}: not a readable Parquet file ({error})") from None
    missing = [name for name in CASES.names if name not in table.column_names and name != "prompt"]
    if missing:
        raise CasesError(f"{path}: missing columns {', '.join(missing)} (schema: data_specs.eval.CASES)")
    if "prompt" not in table.column_names:
        table = table.append_column("prompt", pa.nulls(len(table), pa.string()))
    try:
        table = table.select(CASES.names).cast(CASES)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as error:
        raise CasesError(f"{path}: columns do not match data_specs.eval.CASES ({error})") from None
    if len(table) == 0:
        raise CasesError(f"{path}: no cases")
    ids = table.column("case_id").to_pylist()
    if any(not case_id for case_id in ids):
        raise CasesError(f"{path}: a case has an empty case_id")
    duplicated = [case_id for case_id, count in Counter(ids).items() if count > 1]
    if duplicated:
        raise CasesError(f"{path}: duplicate case_id {duplicated[0]!r}")
    return table


def _image(struct: dict | None, base_dir: Path, what: str) -> tuple[Image.Image, str]:
    """A decoded image from an `{bytes, path}` struct and a key for its content."""
    if struct is None or (struct.get("bytes") is None and not struct.get("path")):
        raise UnreadableImage("missing_file", f"{what}: neither bytes nor path")
    if struct.get("bytes") is not None:
        data = struct["bytes"]
        return decode_image(data, what), hashlib.sha1(data).hexdigest()
    path = Path(struct["path"]).expanduser()
    path = path if path.is_absolute() else base_dir / path
    image = decode_image(path, f"{what} ({struct['path']})")
    return image, hashlib.sha1(str(path.resolve()).encode()).hexdigest()


def decode_case(row: dict, base_dir: Path) -> tuple[Case | None, list[dict]]:
    """One case with its images decoded, or None; every drop (the case, or one candidate) with its reason."""
    case_id = row["case_id"]

    def drop(reason: str, detail: str, candidate: int | None = None) -> dict:
        return {"case_id": case_id, "candidate": candidate, "reason": reason, "detail": detail}

    categories, references = row["categories"] or [], row["references"] or []
    if not references:
        return None, [drop("no_references", "the case has no reference images")]
    if len(categories) != len(references):
        return None, [drop("categories_references_mismatch", f"{len(categories)} categories for {len(references)} references")]
    bad = [c for c in categories if not c or not c.strip() or "." in c]
    if bad:
        return None, [drop("bad_category", f"{bad[0]!r}: a category must be non-empty and hold no '.' (the detector's separator)")]
    if not row["generated"]:
        return None, [drop("no_generated", "the case has no generated image")]
    images, keys = [], []
    for k, struct in enumerate(references):
        try:
            image, key = _image(struct, base_dir, f"reference {k}")
        except UnreadableImage as error:
            return None, [drop(f"reference_{error.reason}", error.detail)]
        images.append(image)
        keys.append(key)
    drops, candidates, kept = [], [], []
    for k, struct in enumerate(row["generated"]):
        try:
            candidates.append(_image(struct, base_dir, f"generated {k}")[0])
            kept.append(k)
        except UnreadableImage as error:
            drops.append(drop(error.reason, error.detail, k))
    if not candidates:
        return None, drops + [drop("no_readable_generated", "every generated image was dropped")]
    prompt = row["prompt"] if row.get("prompt") else row["instruction"]
    return Case(case_id, row["instruction"], prompt, list(categories), images, keys, candidates, kept), drops


def _assign(similarity: np.ndarray) -> dict[int, int]:
    """Subject row -> box column, one-to-one, taking the most similar remaining pair first."""
    assignment: dict[int, int] = {}
    if similarity.size == 0:
        return assignment
    order = np.dstack(np.unravel_index(np.argsort(-similarity, axis=None, kind="stable"), similarity.shape))[0]
    used_boxes: set[int] = set()
    for subject, box in order:
        if subject not in assignment and box not in used_boxes:
            assignment[int(subject)] = int(box)
            used_boxes.add(int(box))
    return assignment


def score_cases(scorer: Scorer, detector, cases: list[Case], grounding: GroundingParams = GroundingParams(),
                with_selection: bool = False) -> tuple[list[dict], list[dict]]:
    """Candidate rows (one per generated image: UNO-style, CLIP-T, grounded, missing rate, worst
    subject, selector score) and subject rows (one per subject per generated image).

    Three batched model passes in all: references + candidates, detection over candidates, crops."""
    unique_refs: dict[str, Image.Image] = {}
    for case in cases:
        unique_refs.update({key: image for key, image in zip(case.reference_keys, case.references) if key not in unique_refs})
    ref_slot = {key: i for i, key in enumerate(unique_refs)}
    flat = [(c, k) for c, case in enumerate(cases) for k in range(len(case.candidates))]
    candidates = [cases[c].candidates[k] for c, k in flat]
    embeddings = scorer.embed_images(list(unique_refs.values()) + candidates)
    refs, gens = embeddings.take(slice(0, len(unique_refs))), embeddings.take(slice(len(unique_refs), None))
    prompts = {prompt: i for i, prompt in enumerate(dict.fromkeys(case.prompt for case in cases))}
    text_rows = scorer.embed_texts(list(prompts))
    clip_t = rowwise_cosine(gens.clip, text_rows[[prompts[cases[c].prompt] for c, _ in flat]])
    selection = (scorer.selection_scores(candidates, [cases[c].prompt for c, _ in flat]) if with_selection
                 else np.full(len(flat), np.nan))

    phrases = [list(dict.fromkeys(cases[c].categories)) for c, _ in flat]
    with detector.lock:
        detections = detector.detect(candidates, phrases, box_threshold=grounding.box_threshold, text_threshold=grounding.text_threshold)
    # Per candidate and category: the best boxes, then every crop embedded in one pass.
    crops, crop_boxes = [], []  # crop_boxes[f][category] -> list of (crop slot, box, detector score)
    for f, (found, image) in enumerate(zip(detections, candidates)):
        case = cases[flat[f][0]]
        areas = (found.boxes[:, 2] - found.boxes[:, 0]) * (found.boxes[:, 3] - found.boxes[:, 1])
        by_category = {}
        for p, category in enumerate(phrases[f]):
            chosen = [i for i in np.flatnonzero((found.phrase_index == p) & (areas >= grounding.min_box_area))]
            chosen = sorted(chosen, key=lambda i: -found.scores[i])[: grounding.candidates_per_subject * case.categories.count(category)]
            by_category[category] = [(len(crops) + j, found.boxes[i], float(found.scores[i])) for j, i in enumerate(chosen)]
            crops.extend(crop(image, found.boxes[i], grounding.crop_margin) for i in chosen)
        crop_boxes.append(by_category)
    crop_emb = scorer.embed_images(crops) if crops else None

    candidate_rows, subject_rows = [], []
    for f, (c, k) in enumerate(flat):
        case = cases[c]
        slots = [ref_slot[key] for key in case.reference_keys]
        uno_dino = cosine_matrix(refs.dino[slots], gens.dino[f : f + 1])[:, 0]
        uno_clip = cosine_matrix(refs.clip[slots], gens.clip[f : f + 1])[:, 0]
        grounded_dino = np.full(len(slots), np.nan)
        grounded_clip = np.full(len(slots), np.nan)
        boxes: list[Any] = [None] * len(slots)
        box_scores = [float("nan")] * len(slots)
        for category, options in crop_boxes[f].items():
            members = [s for s, name in enumerate(case.categories) if name == category]
            if not options:
                continue
            crop_slots = [slot for slot, _, _ in options]
            dino_sim = cosine_matrix(refs.dino[[slots[s] for s in members]], crop_emb.dino[crop_slots])
            clip_sim = cosine_matrix(refs.clip[[slots[s] for s in members]], crop_emb.clip[crop_slots])
            for row, column in _assign(dino_sim).items():
                subject = members[row]
                grounded_dino[subject], grounded_clip[subject] = dino_sim[row, column], clip_sim[row, column]
                boxes[subject], box_scores[subject] = [float(v) for v in options[column][1]], options[column][2]
        found = ~np.isnan(grounded_dino)
        scored_dino = np.where(found, grounded_dino, MISSING_SCORE)
        worst = int(np.argmin(scored_dino))
        candidate_rows.append({
            "case_id": case.case_id, "candidate": case.candidate_index[k], "n_subjects": len(slots), "prompt": case.prompt,
            "uno_dino": float(uno_dino.mean()), "uno_clip_i": float(uno_clip.mean()), "clip_t": float(clip_t[f]),
            "grounded_dino": float(scored_dino.mean()),
            "grounded_clip_i": float(np.where(found, grounded_clip, MISSING_SCORE).mean()),
            "grounded_dino_found": float(grounded_dino[found].mean()) if found.any() else float("nan"),
            "missing_rate": float(1 - found.mean()), "missing_subjects": int((~found).sum()),
            "worst_subject": worst, "worst_category": case.categories[worst], "worst_dino": float(scored_dino[worst]),
            "select_clip_t": float(selection[f]),
        })
        for s, category in enumerate(case.categories):
            subject_rows.append({
                "case_id": case.case_id, "candidate": case.candidate_index[k], "n_subjects": len(slots), "subject": s,
                "category": category, "uno_dino": float(uno_dino[s]), "uno_clip_i": float(uno_clip[s]), "found": bool(found[s]),
                "box": boxes[s], "detector_score": box_scores[s],
                "grounded_dino": float(grounded_dino[s]), "grounded_clip_i": float(grounded_clip[s]),
            })
    return candidate_rows, subject_rows


def case_means(candidate_rows: list[dict]) -> list[dict]:
    """One row per case: each metric averaged over the case's candidates (the expected score of a
    single sample, i.e. Pass@1, with less variance than scoring the first sample only)."""
    by_case: dict[str, list[dict]] = {}
    for row in candidate_rows:
        by_case.setdefault(row["case_id"], []).append(row)
    return [
        {"case_id": case_id, "n_subjects": rows[0]["n_subjects"], "candidates": len(rows),
         **{m.name: float(np.mean([r[m.name] for r in rows])) for m in CASE_METRICS}}
        for case_id, rows in by_case.items()
    ]


def by_subject_count(candidate_rows: list[dict], samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> list[dict]:
    """Every metric by subject count, then over all cases (stratified by subject count), each with
    its bootstrap interval over cases."""
    cases = case_means(candidate_rows)
    table = []
    for count in sorted({c["n_subjects"] for c in cases}) + ["all"]:
        chosen = [c for c in cases if count == "all" or c["n_subjects"] == count]
        row: dict[str, Any] = {"subjects": str(count), "cases": len(chosen), "images": sum(c["candidates"] for c in chosen)}
        for metric in CASE_METRICS:
            estimate = bootstrap_estimate([c[metric.name] for c in chosen], [c["n_subjects"] for c in chosen],
                                          samples=samples, confidence=confidence, seed=seed)
            m = metric.name
            row |= {m: estimate.mean, f"{m}_ci_low": estimate.ci_low, f"{m}_ci_high": estimate.ci_high}
        table.append(row)
    return table
