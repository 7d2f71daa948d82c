"""The evaluation spec: which models score (DINO, CLIP-I/CLIP-T, the Pass@N selector, the detector of
the grounded score), an optional generator, and the scoring parameters; plus the Arrow schema of the
generic multi-subject cases table that the MSIC benchmark (or any user) feeds the scorer, the metrics
(each a `Metric`, named once) and the scores tables built from them.

A bad spec fails in `load_eval_spec` before any model loads, with one line naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_specs import load_yaml, resolve_spec_path, shipped
from data_specs.roles import RoleSpec, SpecError, one_line

# Role name in the spec -> the role it must be.
EVAL_ROLES: dict[str, str] = {
    "dino": "dino",  # DINO score (ViT-S/16 CLS)
    "clip": "clip",  # CLIP-I and CLIP-T (ViT-B/32)
    "clip_select": "clip",  # Pass@N selection by text-image similarity (the paper: ViT-L/14)
    "detector": "detector",  # grounded multi-subject score (GroundingDINO)
    "judge": "vlm",  # optional: the VQAScore-style judge (p(yes) of an open VLM), reported, never selecting
}
OPTIONAL_EVAL_ROLES = frozenset({"judge"})
GENERATOR_ROLES = ("editor", "t2i")

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face `Image` layout
# One multi-subject case: the instruction the generator saw, the text CLIP-T scores against, each
# subject's reference image and category, and one or more generated candidates (in sampling order).
# An image with null bytes is read from `path` (absolute, or relative to the cases file's folder).
CASES = pa.schema(
    [
        ("case_id", pa.string()),
        ("instruction", pa.string()),
        ("prompt", pa.string()),  # null: the instruction is the CLIP-T text
        ("categories", pa.list_(pa.string())),
        ("references", pa.list_(IMAGE)),
        ("generated", pa.list_(IMAGE)),
    ]
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BootstrapParams(_Section):
    samples: int = Field(1000, ge=10, le=100_000)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class GroundingParams(_Section):
    """How the grounded score finds each subject in a generated image."""

    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    candidates_per_subject: int = Field(3, ge=1, le=50, description="boxes of a category kept per subject of it")
    crop_margin: float = Field(0.0, ge=0, le=1, description="context around a box in the crop that is scored")
    min_box_area: float = Field(0.0, ge=0, lt=1, description="boxes under this fraction of the image are ignored")


class PassNParams(_Section):
    identity_weight: float = Field(1.0, ge=0, description="identity-aware selection: text score + weight x identity")


class GenerationParams(_Section):
    """What `--generator` renders for DreamBench: the grid subset, samples per prompt, size, seeds."""

    images_per_prompt: int = Field(1, ge=1, le=64)
    width: int = Field(512, ge=16)
    height: int = Field(512, ge=16)
    seed: int = 0
    unique_token: str = Field("", description="rare token before the class noun (DreamBooth-style models); empty for reference-conditioned ones")
    reference_index: int = Field(0, ge=0, description="which reference image an editor is conditioned on")
    subjects: list[str] | None = Field(None, description="only these subjects (default: all)")
    prompt_indices: list[int] | None = Field(None, description="only these prompt indices 0..24 (default: all)")

    @field_validator("prompt_indices")
    @classmethod
    def _indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(not 0 <= i < 25 for i in value)):
            raise ValueError(f"must be a non-empty list of integers in 0..24, got {value}")
        return value


class EvalSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.\-]*$")
    output_root: str = "out/eval"
    dreambench_root: str | None = Field(None, description="upstream DreamBench folder (`<subject>/NN.jpg`, prompts_and_classes.txt)")
    shard_size: int = Field(8, ge=1, description="subjects (DreamBench) or cases (multi-subject) per task run")
    roles: dict[str, RoleSpec]
    generator: RoleSpec | None = None
    generation: GenerationParams = GenerationParams()
    grounding: GroundingParams = GroundingParams()
    passn: PassNParams = PassNParams()
    bootstrap: BootstrapParams = BootstrapParams()

    @model_validator(mode="before")
    @classmethod
    def _role_names(cls, data: Any) -> Any:
        # A role entry's role is implied by its key, so specs need not repeat it.
        if isinstance(data, dict) and isinstance(data.get("roles"), dict):
            roles = {k: ({"role": EVAL_ROLES.get(k, k), **v} if isinstance(v, dict) else v) for k, v in data["roles"].items()}
            data = {**data, "roles": roles}
        return data

    @model_validator(mode="after")
    def _roles(self) -> "EvalSpec":
        unknown = sorted(set(self.roles) - set(EVAL_ROLES))
        if unknown:
            raise ValueError(f"roles: unknown role {unknown[0]!r}; known: {', '.join(EVAL_ROLES)}")
        missing = [name for name in EVAL_ROLES if name not in self.roles and name not in OPTIONAL_EVAL_ROLES]
        if missing:
            raise ValueError(f"roles: missing {', '.join(missing)}")
        for name, spec in self.roles.items():
            if spec.role != EVAL_ROLES[name]:
                raise ValueError(f"roles.{name}: must be a {EVAL_ROLES[name]} role, got {spec.role}")
        if self.generator is not None and self.generator.role not in GENERATOR_ROLES:
            raise ValueError(f"generator: must be an editor or t2i role, got {self.generator.role}")
        return self

    def out_dir(self) -> Path:
        return (Path(self.output_root).expanduser() / self.name).resolve()


def parse_eval_spec(data: Any, source: str = "spec") -> EvalSpec:
    try:
        return EvalSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{source}: {one_line(error)}") from None


def load_eval_spec(path: str | Path) -> EvalSpec:
    """Read and validate an eval spec YAML (a bare file name also looks in the shipped specs)."""
    path = resolve_spec_path(path)
    spec = parse_eval_spec(load_yaml(path), source=path.name)
    root = spec.dreambench_root
    if root and not Path(root).expanduser().is_absolute() and path.resolve().parent == shipped(".").resolve():
        # A shipped spec's relative paths are relative to the project folder, wherever it runs from.
        spec = spec.model_copy(update={"dreambench_root": str(shipped(".").resolve().parent / root)})
    return spec


def parse_generator(text: str) -> RoleSpec:
    """`--generator`: a YAML file holding one role spec, or `<role>=<model>` (`editor=zoo:flux_kontext`,
    `t2i=black-forest-labs/FLUX.1-dev`) with the role's diffusers backend."""
    from data_specs.roles import parse_role_spec

    if "=" in text and not Path(text).exists():
        role, model = text.split("=", 1)
        data: Any = {"role": role.strip(), "backend": "diffusers", "model": model.strip()}
    else:
        data = load_yaml(text)
        if not isinstance(data, dict):
            raise SpecError(f"generator: {text} must hold one role spec mapping")
    spec = parse_role_spec(data, where="generator")
    if spec.role not in GENERATOR_ROLES:
        raise SpecError(f"generator.role: must be editor or t2i, got {spec.role}")
    return spec


# The paper's headline results (arXiv 2604.07422), shown in reports only as published figures: they
# are the paper's own model on the paper's own MSIC set, not measured by this project (docs/FIDELITY.md).
PAPER_FIGURES_SOURCE = "published figure (arXiv 2604.07422, the paper's model), not measured here"
PAPER_FIGURES: list[dict[str, Any]] = [
    {"benchmark": "msic", "method": "MUSIC", "setting": "1 sample", "dino": 0.622, "clip_i": 0.812, "clip_t": 0.322},
    {"benchmark": "msic", "method": "MUSIC", "setting": "Pass@N", "dino": 0.631, "clip_i": 0.822, "clip_t": 0.330},
    {"benchmark": "dreambench", "method": "MUSIC", "setting": "1 sample", "dino": 0.761, "clip_i": 0.837, "clip_t": None},
]

@dataclass(frozen=True)
class Metric:
    """One score, named once (as torchmetrics names a metric): `name` is its column in every scores
    table, summary and Pass@N curve, `label` its name in reports and plots."""

    name: str
    label: str

    @property
    def column(self) -> tuple[str, pa.DataType]:
        return self.name, pa.float64()


DINO = Metric("dino", "DINO")
CLIP_I = Metric("clip_i", "CLIP-I")
CLIP_T = Metric("clip_t", "CLIP-T")
UNO_DINO = Metric("uno_dino", "DINO (UNO)")
UNO_CLIP_I = Metric("uno_clip_i", "CLIP-I (UNO)")
GROUNDED_DINO = Metric("grounded_dino", "grounded DINO")
GROUNDED_CLIP_I = Metric("grounded_clip_i", "grounded CLIP-I")
MISSING_RATE = Metric("missing_rate", "missing rate")  # a fraction of subjects, not a cosine
WORST_DINO = Metric("worst_dino", "worst-subject DINO")
JUDGE_SUBJECTS = Metric("judge_subjects", "judge (subjects)")
JUDGE_INSTRUCTION = Metric("judge_instruction", "judge (instruction)")
JUDGE = Metric("judge", "judge")
# DreamBench's scores of a generated image against its subject's photos and its prompt.
DREAMBENCH_METRICS = (DINO, CLIP_I, CLIP_T)
# A multi-subject candidate's scores, reported by subject count.
CASE_METRICS = (UNO_DINO, UNO_CLIP_I, CLIP_T, GROUNDED_DINO, GROUNDED_CLIP_I, MISSING_RATE, WORST_DINO)
# The VQAScore-style judge (music_model.scoring.judge), reported, never selecting.
JUDGE_METRICS = (JUDGE_SUBJECTS, JUDGE_INSTRUCTION, JUDGE)

# Output tables. Scores are raw cosines in [-1, 1]; NaN where a score does not exist (no selector run,
# a subject not found by the detector).
DREAMBENCH_SCORES = pa.schema([
    ("subject", pa.string()), ("class_noun", pa.string()), ("live", pa.bool_()), ("prompt_index", pa.int32()),
    ("sample", pa.int32()), ("prompt", pa.string()), ("path", pa.string()), ("references", pa.int32()),
    *(m.column for m in DREAMBENCH_METRICS), ("select_clip_t", pa.float64()),
])
DREAMBENCH_DROPS = pa.schema([("path", pa.string()), ("subject", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
CANDIDATE_SCORES = pa.schema([
    ("case_id", pa.string()), ("candidate", pa.int32()), ("n_subjects", pa.int32()), ("prompt", pa.string()),
    UNO_DINO.column, UNO_CLIP_I.column, CLIP_T.column, GROUNDED_DINO.column, GROUNDED_CLIP_I.column, ("grounded_dino_found", pa.float64()),
    MISSING_RATE.column, ("missing_subjects", pa.int32()), ("worst_subject", pa.int32()),
    ("worst_category", pa.string()), WORST_DINO.column, ("select_clip_t", pa.float64()),
])
SUBJECT_SCORES = pa.schema([
    ("case_id", pa.string()), ("candidate", pa.int32()), ("n_subjects", pa.int32()), ("subject", pa.int32()),
    ("category", pa.string()), UNO_DINO.column, UNO_CLIP_I.column, ("found", pa.bool_()),
    ("box", pa.list_(pa.float32())), ("detector_score", pa.float64()), GROUNDED_DINO.column, GROUNDED_CLIP_I.column,
])
CASE_DROPS = pa.schema([("case_id", pa.string()), ("candidate", pa.int32()), ("reason", pa.string()), ("detail", pa.string())])
