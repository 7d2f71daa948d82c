"""The build spec: one YAML file that says what a training-set (or benchmark) build makes.

Every stage parameter has the paper's default (docs/FIDELITY.md lists where the project departs
from the paper, and why); a bad spec fails in `load_build_spec` before any model loads, with one
line that names the field.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_specs import load_yaml, resolve_spec_path, shipped
from data_specs.roles import Role, RoleSpec, SpecError, one_line
from data_specs.schemas import SCORE_COLUMNS

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComposeParams(_Section):
    """Sample categories, then the LLM keeps plausible combinations and writes the scene caption."""

    max_caption_chars: int = Field(240, ge=16, le=2000)
    require_plausible: bool = Field(True, description="drop combinations the LLM judges implausible")
    require_named: bool = Field(True, description="retry, then drop, a caption that does not name every category")
    caption_attempts: int = Field(3, ge=1, description="captions tried (each with a new seed) before a sample is dropped")


class SynthesizeParams(_Section):
    width: int = Field(1024, ge=16)
    height: int = Field(1024, ge=16)


class DetectParams(_Section):
    min_box_area: float = Field(0.01, ge=0, lt=1, description="a subject whose best box is under this fraction of the "
                                                               "image is removed")
    max_box_overlap: float = Field(0.9, ge=0, le=1, description="two subjects whose boxes overlap more than this (IoU) "
                                                               "are one object named twice: the lower-scoring one is "
                                                               "removed (1: never)")
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)


class VerifyParams(_Section):
    min_subjects: int = Field(2, ge=1, description="a sample with fewer verified subjects is dropped")
    crop_margin: float = Field(0.1, ge=0, le=1, description="context around a box in the crop the VLM judges")
    require_match: bool = Field(True, description="remove subjects the VLM rejects (tiny specs: a random VLM's verdict)")
    min_confidence: float = Field(0.5, ge=0, le=1, description="the VLM's p(yes) a subject needs to be kept")


class RerenderParams(_Section):
    # {category}: one of the subject's category, in the singular ("sneaker" for "sneakers").
    prompt: str = "Show this {category} from a different viewpoint and in a different pose, on a plain background."
    size: int = Field(512, ge=16, description="a reference's longer side in pixels (its aspect is its crop's)")
    render_size: int = Field(1024, ge=16, description="Kontext renders at its preferred ~1 MP resolutions scaled by "
                                                       "render_size / 1024 (1024: as trained; tiny specs: small)")
    min_dino: float = Field(0.4, ge=-1, le=1, description="below: identity lost")
    max_dino: float = Field(0.95, ge=-1, le=1, description="above: a copy of the crop, not a new view")
    crop_margin: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> "RerenderParams":
        if self.min_dino >= self.max_dino:
            raise ValueError(f"min_dino ({self.min_dino}) must be below max_dino ({self.max_dino})")
        return self


class AnnotateParams(_Section):
    max_instruction_chars: int = Field(300, ge=16, le=4000)
    max_relations: int = Field(6, ge=0, le=32)


class LayoutParams(_Section):
    grid: int = Field(8, ge=2, le=32)
    lam: float = Field(0.05, gt=0, le=1, description="tau = lam * mean IoU")


class DecimateParams(_Section):
    min_subjects: int = Field(2, ge=1)


class FilterParams(_Section):
    min_subjects: int = Field(2, ge=1)
    max_subjects: int = Field(12, ge=1)
    near_duplicate_clip: float = Field(0.95, ge=-1, le=1.0001, description="CLIP image cosine at or above: near duplicate")


class PublishParams(_Section):
    rows_per_file: int = Field(256, ge=1)
    max_samples: int | None = Field(None, ge=1, description="cap on published samples (deterministic: lowest IDs)")


QUANTILES = ("p05", "p25", "p50", "p75", "p95")


class GateParams(_Section):
    """Expectations a new release must meet to become current (each off when unset): absolute, and
    against its parent (the current release)."""

    min_samples: int | Literal["target"] | None = Field(
        None, description="fewest samples: a number, or `target` (target.samples, else publish.max_samples)")
    keep_rate_distance: float | None = Field(None, ge=0, le=1, description="most a stage's keep rate may move from the parent's")
    score_bounds: dict[str, dict[str, tuple[float | None, float | None]]] = Field(
        {}, description="score column -> quantile (p05 p25 p50 p75 p95) -> [low, high] (null: unbounded)")
    max_changed_share: float | None = Field(None, ge=0, description="most samples added + removed + changed, as a share of the parent's")

    @field_validator("score_bounds")
    @classmethod
    def _quantiles(cls, value: dict) -> dict:
        for column, bounds in value.items():
            if column not in SCORE_COLUMNS:
                raise ValueError(f"{column!r} is not a published score; known: {', '.join(SCORE_COLUMNS)}")
            unknown = sorted(set(bounds) - set(QUANTILES))
            if unknown:
                raise ValueError(f"{column}: unknown quantiles {unknown}; known: {', '.join(QUANTILES)}")
        return value


class ReleaseParams(_Section):
    """Every publish whose data differs from the current release is a release (`<build>/releases/vN`)."""

    keep: int = Field(5, ge=1, description="releases `music clean` keeps (the newest, and always the current one)")
    gates: GateParams = GateParams()


class TargetParams(_Section):
    """Build to a target: sources are made in waves until `samples` publishable samples exist (with
    `mix`, that many of each subject count), and exactly that many are published;
    `num_source_images` is then the ceiling on sources."""

    samples: int = Field(ge=1, description="samples to publish")
    mix: dict[int, float] | None = Field(None, description="subject count -> share of the published samples (normalised)")
    wave_cost: float = Field(16.0, ge=0, description="the fixed cost of one more wave (every stage's model loads), in sources' "
                             "worth of GPU work: what a wave's size weighs against overshoot (`music plan --bench` measures it)")

    @field_validator("mix")
    @classmethod
    def _mix(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if value is None:
            return None
        if not value or any(share < 0 for share in value.values()) or sum(value.values()) <= 0:
            raise ValueError(f"mix: shares must be non-negative with a positive sum, got {value}")
        return dict(sorted((count, share) for count, share in value.items() if share > 0))


class MsicParams(_Section):
    """The benchmark build: cases stratified by subject count, drawn from the decimated samples."""

    version: str = Field("1.0", pattern=r"^[\w.\-]+$")
    strata: list[int] = Field(default_factory=lambda: list(range(1, 13)))
    cases_per_stratum: int = Field(20, ge=1)
    training_dataset: str | None = Field(None, description="published training set checked for overlap")
    # A near-duplicate needs both: CLIP alone matches look-alikes of one category, DINO is instance-level.
    overlap_clip: float = Field(0.95, ge=-1, le=1.0001, description="centred CLIP cosine at or above: near-duplicate (with DINO)")
    overlap_dino: float = Field(0.9, ge=-1, le=1.0001, description="centred DINO cosine at or above: near-duplicate (with CLIP)")

    @field_validator("strata")
    @classmethod
    def _strata(cls, value: list[int]) -> list[int]:
        if not value or any(not 1 <= k <= 12 for k in value):
            raise ValueError(f"strata must be subject counts in 1..12, got {value}")
        return sorted(set(value))


class BuildSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.\-]*$")
    seed: int = 0
    num_source_images: int = Field(ge=1, description="source images to make (with a target: the most it may make)")
    subject_counts: dict[int, float] = Field(description="subject count (2..12) -> sampling weight")
    categories: str = "objects365"
    shard_size: int = Field(16, ge=1)
    output_root: str = "out"
    roles: dict[str, RoleSpec]
    compose: ComposeParams = ComposeParams()
    synthesize: SynthesizeParams = SynthesizeParams()
    detect: DetectParams = DetectParams()
    verify: VerifyParams = VerifyParams()
    rerender: RerenderParams = RerenderParams()
    annotate: AnnotateParams = AnnotateParams()
    layout: LayoutParams = LayoutParams()
    decimate: DecimateParams = DecimateParams()
    filter: FilterParams = FilterParams()
    publish: PublishParams = PublishParams()
    msic: MsicParams | None = None
    release: ReleaseParams = ReleaseParams()
    target: TargetParams | None = None

    @field_validator("subject_counts")
    @classmethod
    def _counts(cls, value: dict[int, float]) -> dict[int, float]:
        if not value:
            raise ValueError("needs at least one subject count")
        for count, weight in value.items():
            if not 1 <= count <= 12:
                raise ValueError(f"subject count {count} is outside 1..12")
            if weight < 0:
                raise ValueError(f"weight of {count} subjects is negative ({weight})")
        if sum(value.values()) <= 0:
            raise ValueError("weights sum to zero")
        return dict(sorted(value.items()))

    @model_validator(mode="before")
    @classmethod
    def _role_names(cls, data: Any) -> Any:
        # A role entry's key is its role unless it says otherwise, so specs need not repeat it.
        if isinstance(data, dict) and isinstance(data.get("roles"), dict):
            data = {**data, "roles": {k: ({"role": k, **v} if isinstance(v, dict) else v) for k, v in data["roles"].items()}}
        return data

    @model_validator(mode="after")
    def _roles_present(self) -> "BuildSpec":
        # Every role kind: the stages (tasks.stages) use each of them.
        needed = sorted(get_args(Role))
        missing = [role for role in needed if role not in self.roles]
        if missing:
            raise ValueError(f"roles: missing {', '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _target_reachable(self) -> "BuildSpec":
        if self.target is None:
            return self
        if self.publish.max_samples is not None:
            raise ValueError("target and publish.max_samples both cap the published samples: keep target.samples")
        if self.msic is not None:
            raise ValueError("target: a benchmark build (msic) selects its cases by strata, not by a target")
        low, high = max(self.filter.min_subjects, self.decimate.min_subjects), min(self.filter.max_subjects, max(self.subject_counts))
        outside = [count for count in (self.target.mix or {}) if not low <= count <= high]
        if outside:
            raise ValueError(f"target.mix: subject counts {outside} cannot be published (this spec publishes {low}..{high})")
        return self

    def spec_hash(self) -> str:
        """Hash of what decides the content: not where it is written, nor which training set the
        benchmark is checked against and how."""
        content = self.model_dump(mode="json", exclude={"output_root", "release"})  # gates and retention change no content
        if content.get("msic"):
            for key in ("training_dataset", "overlap_clip", "overlap_dino"):
                content["msic"].pop(key)
        return hashlib.sha256(canonical_json(content).encode()).hexdigest()[:16]

    def categories_path(self) -> Path:
        return categories_path(self.categories)

    def load_categories(self) -> list[str]:
        return load_categories(self.categories, max(self.subject_counts))


def categories_path(categories: str) -> Path:
    """The category list a spec's `categories` names: `objects365` (shipped) or a file."""
    return shipped("data/objects365_categories.txt") if categories == "objects365" else Path(categories).expanduser()


def load_categories(categories: str, largest_count: int) -> list[str]:
    """The category names, one a line; at least `largest_count` of them."""
    names = [line.strip() for line in categories_path(categories).read_text().splitlines() if line.strip()]
    if len(names) < largest_count:
        raise SpecError(f"categories: {len(names)} names, fewer than the largest subject count")
    return names


def parse_build_spec(data: Any, source: str = "spec") -> BuildSpec:
    try:
        spec = BuildSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{source}: {one_line(error)}") from None
    if spec.categories != "objects365" and not spec.categories_path().exists():
        raise SpecError(f"{source}: categories: file does not exist: {spec.categories}")
    return spec


def load_build_spec(path: str | Path) -> BuildSpec:
    """Read and validate a build spec YAML (a name without a folder looks in the shipped specs)."""
    path = resolve_spec_path(path)
    return parse_build_spec(load_yaml(path), source=path.name)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
