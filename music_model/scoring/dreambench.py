"""DreamBench (the DreamBooth dataset) in its upstream layout, the naming convention for generated
images, and DreamBench scoring as the field runs it.

Upstream layout (github.com/google/dreambooth, `dataset/`)::

    <root>/prompts_and_classes.txt   subject -> class table, 25 object and 25 live prompt templates
    <root>/<subject>/NN.jpg          the subject's real photos (30 subjects, 4-6 photos each)

Live subjects are the cats and dogs (class noun `cat` or `dog`): they use the live templates, every
other subject the object templates.

Generated images (any method's) are scored from a folder named by this convention::

    <images>/<subject>/<PP>_<K>.<ext>

`PP` is the two-digit prompt index 0..24 into the subject's template list, `K` the sample number
(0, 1, ...; any number of images per prompt), `ext` png, jpg, jpeg or webp. `dog/07_0.png` is the
first sample of live prompt 7, "a dog with a mountain in the background". The standard grid is
30 subjects x 25 prompts x K samples.

Scores: DINO and CLIP-I of a generated image are its mean cosine over every real photo of its
subject; CLIP-T its cosine with the prompt holding the class noun (no rare token). A subject's
score is the mean over its generated images (= over every generated x real pair), the benchmark's
the mean over subjects.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_specs.eval import DREAMBENCH_METRICS
from safe_files import write_atomic
from music_model.scoring.metrics import Scorer, UnreadableImage, bootstrap_estimate, decode_image, pair_means, rowwise_cosine

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
LIVE_CLASSES = frozenset({"cat", "dog"})
PROMPTS_FILE = "prompts_and_classes.txt"
_GENERATED_NAME = re.compile(r"^(\d{2})_(\d+)$")
_TEMPLATE = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")


class DreamBenchError(ValueError):
    """A benchmark or generated-images folder that cannot be scored; raised before any model work."""


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    live: bool
    references: tuple[Path, ...]


@dataclass
class DreamBench:
    root: Path
    classes: dict[str, str]  # the full subject -> class table of prompts_and_classes.txt
    object_templates: list[str]
    live_templates: list[str]
    subjects: dict[str, Subject]  # the subjects whose photos are in `root`

    def templates(self, subject: str) -> list[str]:
        return self.live_templates if self.is_live(subject) else self.object_templates

    def is_live(self, subject: str) -> bool:
        return self.classes[subject] in LIVE_CLASSES

    def prompt(self, subject: str, index: int, unique_token: str = "") -> str:
        """Prompt `index` of `subject`: with `unique_token` for generation by a DreamBooth-style
        model, without it (class noun only) for CLIP-T."""
        return " ".join(self.templates(subject)[index].format(unique_token, self.classes[subject]).split())

    def absent_subjects(self) -> list[str]:
        """Subjects of the class table whose photos are not in `root` (a subset copy)."""
        return [name for name in self.classes if name not in self.subjects]


def parse_prompts_and_classes(text: str, source: str = PROMPTS_FILE) -> tuple[dict[str, str], list[str], list[str]]:
    """The subject -> class table and the object and live prompt templates of the upstream file."""
    lines = text.splitlines()
    try:
        header = next(i for i, line in enumerate(lines) if line.strip().replace(" ", "") == "subject_name,class")
    except StopIteration:
        raise DreamBenchError(f"{source}: no 'subject_name,class' table") from None
    classes: dict[str, str] = {}
    for line in lines[header + 1 :]:
        if not line.strip():
            break
        name, _, noun = line.partition(",")
        if not name.strip() or not noun.strip():
            raise DreamBenchError(f"{source}: bad class table row {line!r}")
        classes[name.strip()] = noun.strip()
    templates: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in lines:
        lowered = line.strip().lower()
        if lowered.startswith("object prompts"):
            section = "object"
        elif lowered.startswith("live subject prompts"):
            section = "live"
        elif (match := _TEMPLATE.match(line)) and section:
            templates[section].append(match.group(2))
    if not classes:
        raise DreamBenchError(f"{source}: the class table is empty")
    for kind, found in templates.items():
        if not found:
            raise DreamBenchError(f"{source}: no {kind} prompt templates")
        for template in found:
            if "{0}" not in template or "{1}" not in template:
                raise DreamBenchError(f"{source}: template {template!r} lacks the {{0}} token and {{1}} class slots")
    return classes, templates["object"], templates["live"]


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def visible_files(folder: Path) -> list[Path]:
    """Files of a folder, hidden ones (`.DS_Store`, editor swap files) left out."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def load_dreambench(root: str | Path, check_images: bool = True) -> DreamBench:
    """Read and check a DreamBench folder. Everything that would make scores wrong fails here, before
    any model loads: no table, a folder that is not a subject, a subject with no photos, a photo that
    is not an image or does not decode (with `check_images`, every photo is decoded once)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DreamBenchError(f"DreamBench folder not found: {root}")
    table = root / PROMPTS_FILE
    if not table.is_file():
        raise DreamBenchError(f"{root}: no {PROMPTS_FILE} (the upstream subject table and prompt templates)")
    classes, object_templates, live_templates = parse_prompts_and_classes(table.read_text(), str(table))
    subjects = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name not in classes:
            raise DreamBenchError(f"{folder}: folder is not a subject of {PROMPTS_FILE}")
        files = visible_files(folder)
        strays = [p.name for p in files if not is_image_name(p)]
        if strays:
            raise DreamBenchError(f"{folder}: not an image file among the references: {', '.join(strays)}")
        if not files:
            raise DreamBenchError(f"subject {folder.name!r} has no reference images in {folder}")
        if check_images:
            for path in files:
                try:
                    decode_image(path)
                except UnreadableImage as error:
                    raise DreamBenchError(f"subject {folder.name!r}: reference {error}") from None
        subjects[folder.name] = Subject(folder.name, classes[folder.name], classes[folder.name] in LIVE_CLASSES, tuple(files))
    if not subjects:
        raise DreamBenchError(f"{root}: no subject folders")
    return DreamBench(root, classes, object_templates, live_templates, subjects)


# --- generated images ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedImage:
    subject: str
    prompt_index: int
    sample: int
    path: Path


@dataclass
class Scan:
    images: list[GeneratedImage]
    drops: list[dict] = field(default_factory=list)  # {path, subject, reason, detail}

    def drop_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(d["reason"] for d in self.drops).items()))


def generated_path(images_dir: str | Path, subject: str, prompt_index: int, sample: int, ext: str = "png") -> Path:
    """Where the naming convention puts sample `sample` of prompt `prompt_index` of `subject`."""
    return Path(images_dir) / subject / f"{prompt_index:02d}_{sample}.{ext}"


def _drop(path: Path, subject: str | None, reason: str, detail: str) -> dict:
    return {"path": str(path), "subject": subject, "reason": reason, "detail": detail}


def scan_generated(bench: DreamBench, images_dir: str | Path) -> Scan:
    """Match a folder of generated images to the benchmark by the naming convention. A folder that
    does not exist, holds no files or holds nothing scorable is an error (before any model work);
    a single file that breaks the convention is dropped with its reason. Decoding happens later,
    where an unreadable image is dropped too."""
    images_dir = Path(images_dir).expanduser()
    if not images_dir.is_dir():
        raise DreamBenchError(f"generated images folder not found: {images_dir}")
    files = sorted(p for p in images_dir.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(images_dir).parts))
    if not files:
        raise DreamBenchError(f"{images_dir}: no generated images (the folder is empty)")
    scan = Scan([])
    seen: dict[tuple[str, int, int], Path] = {}
    for path in files:
        parts = path.relative_to(images_dir).parts
        subject = parts[0] if len(parts) == 2 else None
        if len(parts) != 2:
            scan.drops.append(_drop(path, None, "bad_name", "expected <subject>/<PP>_<K>.<ext>"))
            continue
        if not is_image_name(path):
            scan.drops.append(_drop(path, subject, "not_an_image", f"extension {path.suffix or '(none)'!r} is not one of {', '.join(IMAGE_EXTENSIONS)}"))
            continue
        match = _GENERATED_NAME.match(path.stem)
        if not match:
            scan.drops.append(_drop(path, subject, "bad_name", f"{path.name!r} is not <PP>_<K>.<ext> (e.g. 07_0.png)"))
            continue
        if subject not in bench.classes:
            scan.drops.append(_drop(path, subject, "unknown_subject", f"{subject!r} is not a DreamBench subject"))
            continue
        if subject not in bench.subjects:
            scan.drops.append(_drop(path, subject, "no_references", f"no photos of {subject!r} in {bench.root}"))
            continue
        prompt_index, sample = int(match.group(1)), int(match.group(2))
        if prompt_index >= len(bench.templates(subject)):
            scan.drops.append(_drop(path, subject, "prompt_index_out_of_range", f"{prompt_index} >= {len(bench.templates(subject))} prompts"))
            continue
        key = (subject, prompt_index, sample)
        if key in seen:
            scan.drops.append(_drop(path, subject, "duplicate", f"same prompt and sample as {seen[key].name}"))
            continue
        seen[key] = path
        scan.images.append(GeneratedImage(subject, prompt_index, sample, path))
    if not scan.images:
        raise DreamBenchError(f"{images_dir}: no file follows <subject>/<PP>_<K>.<ext> for a subject with references; dropped {scan.drop_counts()}")
    return scan


def coverage(bench: DreamBench, images: list[GeneratedImage]) -> list[dict]:
    """Per benchmark subject: prompts with at least one image, and the grid cells (prompt x sample,
    up to the largest sample count seen) that have no image."""
    samples_per_prompt = max((image.sample for image in images), default=-1) + 1
    rows = []
    for name in bench.subjects:
        mine = {(image.prompt_index, image.sample) for image in images if image.subject == name}
        prompts = len(bench.templates(name))
        rows.append({
            "subject": name,
            "prompts_covered": len({p for p, _ in mine}),
            "prompts": prompts,
            "missing_cells": prompts * samples_per_prompt - len(mine),
        })
    return rows


# --- scoring -------------------------------------------------------------------------------------


def score_generated(scorer: Scorer, bench: DreamBench, images: list[GeneratedImage], with_selection: bool = False) -> tuple[list[dict], list[dict]]:
    """Per-image DINO, CLIP-I and CLIP-T (and the Pass@N selector's text score with `with_selection`)
    for generated images of some subjects, plus the images dropped because they do not decode.

    All references and generated images go through each model in one batched pass; each prompt
    text is embedded once."""
    decoded, kept, drops = [], [], []
    for item in images:
        try:
            decoded.append(decode_image(item.path))
            kept.append(item)
        except UnreadableImage as error:
            drops.append(_drop(item.path, item.subject, error.reason, error.detail))
    subjects = list(dict.fromkeys(item.subject for item in kept))
    references, spans = [], {}
    for name in subjects:
        start = len(references)
        for path in bench.subjects[name].references:
            try:
                references.append(decode_image(path))
            except UnreadableImage as error:  # checked at load: the file changed while we ran
                raise DreamBenchError(f"subject {name!r}: reference {error}") from None
        spans[name] = slice(start, len(references))
    if not kept:
        return [], drops
    embeddings = scorer.embed_images(references + decoded)
    ref_emb, gen_emb = embeddings.take(slice(0, len(references))), embeddings.take(slice(len(references), None))
    texts = [bench.prompt(item.subject, item.prompt_index) for item in kept]
    unique_texts = list(dict.fromkeys(texts))
    text_emb = scorer.embed_texts(unique_texts)
    where = {text: i for i, text in enumerate(unique_texts)}
    clip_t = rowwise_cosine(gen_emb.clip, text_emb[[where[t] for t in texts]])
    selection = scorer.selection_scores(decoded, texts) if with_selection else np.full(len(kept), np.nan)
    rows = []
    by_subject = {name: [i for i, item in enumerate(kept) if item.subject == name] for name in subjects}
    for name, indices in by_subject.items():
        mine = gen_emb.take(indices)
        refs = ref_emb.take(spans[name])
        dino, clip_i = pair_means(mine.dino, refs.dino), pair_means(mine.clip, refs.clip)
        for j, i in enumerate(indices):
            item = kept[i]
            rows.append({
                "subject": name, "class_noun": bench.classes[name], "live": bench.is_live(name),
                "prompt_index": item.prompt_index, "sample": item.sample, "prompt": texts[i], "path": str(item.path),
                "references": len(bench.subjects[name].references),
                "dino": float(dino[j]), "clip_i": float(clip_i[j]), "clip_t": float(clip_t[i]),
                "select_clip_t": float(selection[i]),
            })
    return rows, drops


def summarise(rows: list[dict], bench: DreamBench, samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[list[dict], dict[str, Any]]:
    """Per-subject scores and the benchmark scores (mean over subjects, stratified bootstrap
    interval over each subject's images), also split into live and object subjects."""
    by_subject: dict[str, list[dict]] = {}
    for row in rows:
        by_subject.setdefault(row["subject"], []).append(row)
    subject_rows = []
    for name in bench.subjects:
        mine = by_subject.get(name, [])
        entry = {"subject": name, "class_noun": bench.classes[name], "live": bench.is_live(name), "images": len(mine),
                 "pairs": len(mine) * len(bench.subjects[name].references)}
        for metric in DREAMBENCH_METRICS:
            entry[metric.name] = float(np.mean([r[metric.name] for r in mine])) if mine else float("nan")
        subject_rows.append(entry)
    overall: dict[str, Any] = {}
    for part, keep in (("all", lambda r: True), ("live", lambda r: r["live"]), ("object", lambda r: not r["live"])):
        chosen = [r for r in rows if keep(r)]
        overall[part] = {
            metric.name: bootstrap_estimate([r[metric.name] for r in chosen], [r["subject"] for r in chosen], equal_group_weight=True,
                                            samples=samples, confidence=confidence, seed=seed).as_dict()
            for metric in DREAMBENCH_METRICS
        } | {"subjects": len({r["subject"] for r in chosen}), "images": len(chosen)}
    return subject_rows, overall


# --- generation ----------------------------------------------------------------------------------


def generation_seed(seed: int, subject: str, prompt_index: int, sample: int) -> int:
    """The seed of one grid cell, the same on every machine and in any shard order."""
    digest = hashlib.sha256(f"{seed}:{subject}:{prompt_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def generate_missing(generator, bench: DreamBench, images_dir: str | Path, subjects: list[str], prompt_indices: list[int],
                     samples: int, width: int, height: int, seed: int = 0, unique_token: str = "", reference_index: int = 0) -> dict[str, int]:
    """Render the grid cells of `subjects` that have no image yet (a rerun resumes), writing each by
    the naming convention. An `editor` is conditioned on the subject's photo `reference_index`; a
    `t2i` model sees the prompt only. Returns counts of images made and already there."""
    todo = [(s, p, k) for s in subjects for p in prompt_indices for k in range(samples)
            if not any(generated_path(images_dir, s, p, k, ext).exists() for ext in ("png", "jpg", "jpeg", "webp"))]
    made = 0
    for batch in generator.batches(len(todo)):
        cells = [todo[i] for i in batch]
        prompts = [bench.prompt(s, p, unique_token) for s, p, _ in cells]
        seeds = [generation_seed(seed, s, p, k) for s, p, k in cells]
        with generator.lock:
            if generator.spec.role == "editor":
                references = [decode_image(bench.subjects[s].references[min(reference_index, len(bench.subjects[s].references) - 1)]) for s, _, _ in cells]
                outputs = generator.edit(references, prompts, seeds, width=width, height=height)
            else:
                outputs = generator.generate(prompts, seeds, width=width, height=height)
        for (s, p, k), image in zip(cells, outputs):
            # atomic: a killed run leaves no half-written image under a scorable name
            write_atomic(generated_path(images_dir, s, p, k), lambda tmp, im=image: im.convert("RGB").save(tmp, format="PNG"))
            made += 1
    total = len(subjects) * len(prompt_indices) * samples
    return {"generated": made, "existing": total - len(todo)}

