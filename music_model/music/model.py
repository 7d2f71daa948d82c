"""MUSIC generation: plan, then render, N candidates per case (Pass@N), every seed recorded.

For each case (instruction with `<sN>` subject tags, one reference image per subject, categories
when known) and candidate k, the planner writes a plan from seed `plan_seed` and the renderer draws
from seed `render_seed`, both stable hashes of (seed, case ID, k): the same run gives the same
images on any machine, in any shard order. A plan the repair rules reject is replaced by the
default layout (`default_plan`: subjects in a grid of equal blocks, roles = categories) and the
candidate records why.

Pass@N selection uses the scoring code's selectors (`music_model.scoring.passn`): `clip_t`, the selector
model's text-image similarity (the paper's), and `identity_aware`, that plus the grounded DINO
identity score (`music_model.scoring.multisubject.score_cases`).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from safe_files import write_bytes
from data_specs.train import TrainSpec
from music_model.media.images import to_struct
from music_model.music.plan import Plan, PlanBounds, SubjectNote, format_plan, placement_of_cells
from music_model.music.planner import Planner
from music_model.music.renderer import Renderer, subject_box
from music_model.music.trajectory import Ledger, Selector, Trajectories
from music_model.scoring.passn import halving
from music_model.subjects.layout import GRID

# One row per generated candidate: what made it (seeds, plan text, repairs) and where it is.
GENERATION = pa.schema([
    ("case_id", pa.string()), ("candidate", pa.int32()), ("plan_seed", pa.int64()), ("render_seed", pa.int64()),
    ("planner_output", pa.string()), ("plan", pa.string()), ("repairs", pa.list_(pa.string())), ("plan_error", pa.string()),
    ("path", pa.string()),
    # Pass@N strategies: the plan's screening score, the step after which a pruned candidate stopped
    # (null: rendered to the end, or never rendered when `path` is null) and the case's cost ledger (JSON).
    ("plan_score", pa.float64()), ("stopped_at", pa.int32()), ("cost", pa.string()),
])


@dataclass
class GenerationCase:
    case_id: str
    instruction: str
    references: list[Image.Image]
    categories: list[str | None]
    prompt: str | None = None  # the CLIP-T text when it is not the instruction


@dataclass
class Candidate:
    case_id: str
    index: int
    plan_seed: int
    render_seed: int
    planner_output: str
    plan: Plan
    repairs: list[str] = field(default_factory=list)
    plan_error: str | None = None
    image: Image.Image | None = None
    plan_score: float = 0.0
    stopped_at: int | None = None
    cost: dict | None = None  # the case's ledger (music_model.music.trajectory.Ledger), shared by its candidates
    step_scores: dict[int, float] = field(default_factory=dict)  # selector score of the predicted clean image by step

    def record(self, path: str | None = None) -> dict:
        return {"case_id": self.case_id, "candidate": self.index, "plan_seed": self.plan_seed, "render_seed": self.render_seed,
                "planner_output": self.planner_output, "plan": format_plan(self.plan), "repairs": self.repairs,
                "plan_error": self.plan_error, "path": path, "plan_score": self.plan_score, "stopped_at": self.stopped_at,
                "cost": json.dumps(self.cost, sort_keys=True) if self.cost is not None else None}


def candidate_seed(seed: int, case_id: str, index: int, part: str) -> int:
    """The seed of one part (`plan` or `render`) of candidate `index` of a case."""
    digest = hashlib.sha256(f"{seed}:{case_id}:{index}:{part}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def default_plan(categories: Sequence[str | None], grid: int = GRID) -> Plan:
    """The fallback layout: subjects in reading order over a near-square grid of equal blocks."""
    n = len(categories)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    layout = [0] * (grid * grid)
    for k in range(n):
        r, c = divmod(k, cols)
        for y in range(r * grid // rows, (r + 1) * grid // rows):
            for x in range(c * grid // cols, (c + 1) * grid // cols):
                layout[y * grid + x] = k + 1
    notes = tuple(SubjectNote(k + 1, (categories[k] or "subject").strip() or "subject",
                              placement_of_cells([i for i, v in enumerate(layout) if v == k + 1], grid)) for k in range(n))
    return Plan(notes, (), tuple(layout))


class MusicModel:
    """A planner and a renderer, generating at a fixed size."""

    def __init__(self, planner: Planner, renderer: Renderer, width: int, height: int):
        self.planner, self.renderer = planner, renderer
        self.width, self.height = width, height

    @classmethod
    def from_spec(cls, spec: TrainSpec, adapters: str | Path | None = None, merge: bool = True) -> "MusicModel":
        """The model of a training spec; `adapters` is a trained run's `adapter/` folder (holding
        `planner/` and/or `renderer/`), merged into the weights (`merge`) or kept as adapters."""
        p = spec.plan
        bounds = PlanBounds(p.max_relations, p.max_field_words, p.max_word_chars, p.grid)
        folder = Path(adapters) if adapters else None
        if folder is not None and not any((folder / part).is_dir() for part in ("planner", "renderer")):
            raise FileNotFoundError(f"{folder}: no planner/ or renderer/ adapter (expected a training run's adapter folder)")
        planner_adapter = folder / "planner" if folder and (folder / "planner").is_dir() else None
        renderer_adapter = folder / "renderer" if folder and (folder / "renderer").is_dir() else None
        planner = Planner.load(spec.planner, bounds, planner_adapter, merge)
        renderer = Renderer.load(spec.renderer, renderer_adapter, fuse=merge, background=(spec.render.background,) * 3)
        return cls(planner, renderer, spec.render.width, spec.render.height)

    def close(self) -> None:
        """Free the planner's and the renderer's models (adapter-merged copies are this model's own)."""
        self.planner.vlm.close()
        self.renderer.editor.close()

    def plan(self, cases: Sequence[GenerationCase], candidates: int, seed: int) -> list[list[Candidate]]:
        """The plans of every (case, k), in batches; a rejected plan becomes the default layout."""
        jobs = [(case, k) for case in cases for k in range(candidates)]
        readings = self.planner.plan(
            [case.references for case, _ in jobs], [case.instruction for case, _ in jobs], [case.categories for case, _ in jobs],
            [candidate_seed(seed, case.case_id, k, "plan") for case, k in jobs])
        made = []
        for (case, k), reading in zip(jobs, readings):
            plan = reading.plan if reading.ok else default_plan(case.categories, self.planner.bounds.grid)
            made.append(Candidate(case.case_id, k, reading.seed, candidate_seed(seed, case.case_id, k, "render"), reading.text, plan,
                                  list(reading.repairs), reading.error))
        for candidate in made:
            candidate.plan_score = plan_score(candidate, self.width, self.height)
        return [made[c * candidates : (c + 1) * candidates] for c in range(len(cases))]

    def generate(self, cases: Sequence[GenerationCase], candidates: int, seed: int, strategy=None,
                 selector: Selector | None = None) -> list[list[Candidate]]:
        """`candidates` images per case: plans for every (case, k) first, then renders. `strategy`
        (data_specs.train.GenerateParams; default `full`) decides which candidates are rendered and
        how far; a candidate that is not rendered to its end keeps `image` None. Pruning needs the
        `selector` (the Pass@N text-image score) for the predicted clean images."""
        groups = self.plan(cases, candidates, seed)
        name = strategy.strategy if strategy is not None else "full"
        if name == "full":
            self._render_full(cases, groups)
            return groups
        trajectories = Trajectories(self.renderer.editor)
        checkpoints = strategy.prune_at if name in ("prune", "screen_prune") else []
        for case, group in zip(cases, groups):
            chosen = screen(group, strategy.screen_keep) if name in ("screen", "screen_prune") else list(range(len(group)))
            canvases, prompts = self.renderer.inputs([case.references] * len(chosen), [group[k].plan for k in chosen],
                                                     [case.instruction] * len(chosen), [case.categories] * len(chosen), self.width, self.height)
            images, scores, ledger = trajectories.run(
                canvases, prompts, [group[k].render_seed for k in chosen], self.width, self.height, checkpoints,
                halving(strategy.prune_fraction), selector, [case.prompt or case.instruction] * len(chosen))
            ledger.plans = len(group)
            for j, k in enumerate(chosen):
                group[k].image = images[j]
                group[k].step_scores = {step: values[j] for step, values in scores.items() if j in values}
                group[k].stopped_at = None if images[j] is not None else max(group[k].step_scores)
            for candidate in group:
                candidate.cost = ledger.record()
        return groups

    def _render_full(self, cases: Sequence[GenerationCase], groups: list[list[Candidate]]) -> None:
        """Today's Pass@N: every candidate rendered through the pipeline call, in batches over the
        flat (case, k) list; each case's ledger counts what its candidates took."""
        by_id = {case.case_id: case for case in cases}
        made = [candidate for group in groups for candidate in group]
        batch = self.renderer.editor.batch_size
        steps = int(self.renderer.editor.call_options.get("num_inference_steps", 28))
        tokens = (self.width // 16) * (self.height // 16)  # FLUX: 8x VAE, 2x2 packing
        seconds = [0.0] * len(made)
        for start in range(0, len(made), batch):
            chunk = list(range(start, min(start + batch, len(made))))
            started = time.perf_counter()
            images = self.renderer.render([by_id[made[i].case_id].references for i in chunk], [made[i].plan for i in chunk],
                                          [by_id[made[i].case_id].instruction for i in chunk], [by_id[made[i].case_id].categories for i in chunk],
                                          [made[i].render_seed for i in chunk], self.width, self.height)
            for i, image in zip(chunk, images):
                made[i].image = image
                seconds[i] = (time.perf_counter() - started) / len(chunk)
        offset = 0
        for group in groups:
            n = len(group)
            ledger = Ledger(plans=n, denoise_steps=n * steps, latent_token_steps=n * steps * tokens, decodes=n, renders=n,
                            model_seconds=sum(seconds[offset:offset + n]))
            for candidate in group:
                candidate.cost = ledger.record()
            offset += n


def plan_score(candidate: Candidate, width: int, height: int) -> float:
    """A plan's screening score, before any pixel: the share of subjects that got a layout cell,
    minus the mean pairwise overlap (IoU) of their boxes on the canvas (overlapping subjects hide
    each other), minus 0.1 a repair the plan needed, minus 1 when it was rejected for the default
    layout. Higher is better."""
    plan = candidate.plan
    n = plan.n_subjects
    boxes = [subject_box(plan, s, width, height) for s in range(1, n + 1) if plan.cells(s)]
    overlaps = [box_iou(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]]
    return (len(boxes) / n - (float(np.mean(overlaps)) if overlaps else 0.0) - 0.1 * len(candidate.repairs)
            - (1.0 if candidate.plan_error is not None else 0.0))


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    width, height = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, width) * max(0, height)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def screen(group: Sequence[Candidate], keep: int) -> list[int]:
    """The `keep` best plans of a case by `plan_score` (a tie goes to the earlier candidate), in candidate order."""
    order = sorted(range(len(group)), key=lambda k: (-group[k].plan_score, k))
    return sorted(order[:keep])


def load_model(spec: TrainSpec, adapters: str | Path | None = None, merge: bool = True) -> MusicModel:
    """The model of (spec, adapters), loaded once per process however many shards ask for it; the
    role registry holds it, so `release_roles` frees it with the other models."""
    from music_model.roles import cached
    from music_model.roles.base import resolve_device

    key = json.dumps(["music-model", spec.planner.cache_key(), spec.renderer.cache_key(), spec.plan.model_dump(),
                      spec.render.model_dump(), str(Path(adapters).resolve()) if adapters else None, merge])
    return cached(key, str(resolve_device(spec.renderer.device)), lambda: MusicModel.from_spec(spec, adapters, merge))


# --- Pass@N selection --------------------------------------------------------------------------------


def selection_scores(cases: Sequence[GenerationCase], candidates: Sequence[Sequence[Candidate]], eval_spec) -> list[list[dict]]:
    """Per case, per candidate: the scoring code's candidate row (select_clip_t, grounded_dino, ...)."""
    from music_model.roles import load_role
    from music_model.scoring.metrics import Scorer
    from music_model.scoring.multisubject import Case, score_cases

    scorer = Scorer.from_specs(eval_spec.roles["dino"], eval_spec.roles["clip"], eval_spec.roles["clip_select"])
    scored_cases = []
    for case, made in zip(cases, candidates):
        keys = [hashlib.sha1(_png(image)).hexdigest() for image in case.references]
        scored_cases.append(Case(case.case_id, case.instruction, case.prompt or case.instruction,
                                 [c or "subject" for c in case.categories], list(case.references), keys,
                                 [c.image for c in made], list(range(len(made)))))
    rows, _ = score_cases(scorer, load_role(eval_spec.roles["detector"]), scored_cases, eval_spec.grounding, with_selection=True)
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case_id"], []).append(row)
    return [sorted(by_case[case.case_id], key=lambda r: r["candidate"]) for case in cases]


def pick(rows: Sequence[dict], selector: str, identity_weight: float = 1.0) -> int:
    """The candidate a selector keeps (the highest score; a tie goes to the earlier candidate)."""
    from music_model.scoring.passn import selector_scores

    scores = selector_scores(list(rows), selector, "grounded_dino", identity_weight)
    return int(np.argmax(scores))


# --- benchmark generation ----------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def save_image(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically: a killed run leaves no half-written image under a scorable name."""
    write_bytes(path, _png(image))


def msic_cases_file(msic: str | Path) -> Path:
    """The cases Parquet of an MSIC benchmark folder (`data/*.parquet`) or the file itself."""
    path = Path(msic).expanduser()
    if path.is_file():
        return path
    files = sorted((path / "data").glob("*.parquet"))
    if len(files) != 1:
        raise FileNotFoundError(f"{path}: expected one MSIC cases file under data/, found {len(files)}")
    return files[0]


def read_msic_cases(path: str | Path, start: int = 0, stop: int | None = None) -> list[GenerationCase]:
    """MSIC cases [start, stop) as generation inputs (instruction, references, categories, CLIP-T prompt)."""
    from music_model.media.images import from_struct

    table = pq.read_table(path, columns=["case_id", "instruction", "prompt", "categories", "references"])
    rows = table.slice(start, (stop if stop is not None else len(table)) - start).to_pylist()
    return [GenerationCase(r["case_id"], r["instruction"], [from_struct(x) for x in r["references"]], list(r["categories"]), r["prompt"])
            for r in rows]


def generate_msic_shard(model: MusicModel, cases: Sequence[GenerationCase], out_dir: Path, candidates: int, seed: int,
                        strategy=None, selector: Selector | None = None) -> tuple[list[dict], list[dict]]:
    """Generate `candidates` images per case into `out_dir/images/<case>/<k>.png`; returns rows of the
    scoring code's cases table (data_specs.eval.CASES, images by path relative to `out_dir`) and the
    generation records (GENERATION, one per candidate; a candidate the strategy did not render to
    its end has no path and no image in the cases table)."""
    made = model.generate(cases, candidates, seed, strategy, selector)
    case_rows, records = [], []
    for case, group in zip(cases, made):
        paths = []
        for candidate in group:
            if candidate.image is None:
                records.append(candidate.record(None))
                continue
            relative = f"images/{case.case_id}/{candidate.index}.png"
            save_image(candidate.image, out_dir / relative)
            paths.append(relative)
            records.append(candidate.record(relative))
        case_rows.append({"case_id": case.case_id, "instruction": case.instruction, "prompt": case.prompt,
                          "categories": [c or "subject" for c in case.categories],
                          "references": [to_struct(r) for r in case.references],
                          "generated": [{"bytes": None, "path": p} for p in paths]})
    return case_rows, records


def generate_dreambench_images(model: MusicModel, bench, images_dir: Path, subjects: Sequence[str], prompt_indices: Sequence[int],
                              candidates: int, seed: int, reference_index: int = 0) -> tuple[dict, list[dict]]:
    """Render the DreamBench grid cells of `subjects` that have no image yet, by the naming convention
    (`<subject>/<PP>_<K>.png`): the prompt with `<s1>` in the rare token's place is the instruction,
    photo `reference_index` the one reference, the class noun its category."""
    from music_model.scoring.dreambench import generated_path
    from music_model.scoring.metrics import decode_image

    cases, todo = [], {}
    for subject in subjects:
        photos = bench.subjects[subject].references
        reference = decode_image(photos[min(reference_index, len(photos) - 1)])
        for p in prompt_indices:
            missing = [k for k in range(candidates) if not generated_path(images_dir, subject, p, k).exists()]
            if missing:
                case_id = f"{subject}-{p:02d}"
                cases.append(GenerationCase(case_id, bench.prompt(subject, p, "<s1>"), [reference], [bench.classes[subject]],
                                            bench.prompt(subject, p)))
                todo[case_id] = (subject, p, set(missing))
    records = []
    made = model.generate(cases, candidates, seed) if cases else []
    for case, group in zip(cases, made):
        subject, p, missing = todo[case.case_id]
        for candidate in group:
            if candidate.index in missing:
                path = generated_path(images_dir, subject, p, candidate.index)
                save_image(candidate.image, path)
                records.append(candidate.record(str(path)))
    total = len(subjects) * len(prompt_indices) * candidates
    return {"generated": len(records), "existing": total - len(records)}, records
