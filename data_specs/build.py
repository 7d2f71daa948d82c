"""The build spec: one YAML file that says what a training-set (or benchmark) build makes.

`BuildSpec` holds what every build has (name, seed, sources, roles, and the publish, msic, release
and target sections); each stage's section is the stage's own (`Stage(params=...)` in its module),
and `spec_model` assembles the whole model from the sections the stage list declares
(`tasks.stages.spec_model`), so adding a stage's parameters touches no file here and this package
imports nothing of `tasks`. Every stage parameter has the paper's default (docs/FIDELITY.md lists
where the project departs from the paper, and why); a bad spec fails in `tasks.stages.load_build_spec`
before any model loads, with one line that names the field.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from data_specs import load_yaml, resolve_spec_path, shipped
from data_specs.roles import Role, RoleSpec, SpecError, one_line


class Section(BaseModel):
    """A spec section: a stage declares its own (`Stage(params=...)`, the stage's module holds it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PublishParams(Section):
    rows_per_file: int = Field(256, ge=1)
    max_samples: int | None = Field(None, ge=1, description="cap on published samples (deterministic: lowest IDs)")


QUANTILES = ("p05", "p25", "p50", "p75", "p95")


class GateParams(Section):
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
        for column, bounds in value.items():  # the columns are the stages' (BuildSpec checks them)
            unknown = sorted(set(bounds) - set(QUANTILES))
            if unknown:
                raise ValueError(f"{column}: unknown quantiles {unknown}; known: {', '.join(QUANTILES)}")
        return value


class ReleaseParams(Section):
    """Every publish whose data differs from the current release is a release (`<build>/releases/vN`)."""

    keep: int = Field(5, ge=1, description="releases `music clean` keeps (the newest, and always the current one)")
    gates: GateParams = GateParams()


class TargetParams(Section):
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


class MsicParams(Section):
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


class BuildSpec(Section):
    """What every build spec has; `spec_model` adds each stage's section after `roles`, then the tail
    (`TAIL`). Code takes a `BuildSpec` and reads a stage's section as an attribute (`spec.detect`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.\-]*$")
    seed: int = 0
    num_source_images: int = Field(ge=1, description="source images to make (with a target: the most it may make)")
    subject_counts: dict[int, float] = Field(description="subject count (2..12) -> sampling weight")
    categories: str = "objects365"
    shard_size: int = Field(16, ge=1)
    output_root: str = "out"
    roles: dict[str, RoleSpec]
    # The published score columns the stages declare: what `release.gates.score_bounds` may bound.
    score_columns: ClassVar[tuple[str, ...]] = ()

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

    @model_validator(mode="after")
    def _gate_columns(self) -> "BuildSpec":
        release = getattr(self, "release", None)
        unknown = [c for c in (release.gates.score_bounds if release else {}) if c not in self.score_columns]
        if unknown:
            raise ValueError(f"release.gates.score_bounds: {unknown[0]!r} is not a published score; "
                             f"known: {', '.join(self.score_columns)}")
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


# The sections after the stages', in this order (a spec's field order is its YAML dump's).
TAIL = {"publish": (PublishParams, PublishParams()), "msic": (MsicParams | None, None),
        "release": (ReleaseParams, ReleaseParams()), "target": (TargetParams | None, None)}


@functools.cache
def spec_model(sections: tuple[tuple[str, type[Section]], ...], score_columns: tuple[str, ...]) -> type[BuildSpec]:
    """The whole spec model: `BuildSpec`, then each (name, section) in order with the section's
    defaults, then `TAIL`; `score_columns` are what a gate may bound. Cached: one class per stage list."""
    taken = set(BuildSpec.model_fields) | set(TAIL)
    clashes = [name for name, _ in sections if name in taken]
    if clashes:
        raise SpecError(f"stage sections {clashes} clash with the build spec's own fields")
    fields = {name: (model, model()) for name, model in sections}
    model = create_model("BuildSpec", __base__=BuildSpec, __module__=__name__, **fields, **TAIL)
    model.score_columns = score_columns
    return model


def parse_build_spec(data: Any, model: type[BuildSpec], source: str = "spec") -> BuildSpec:
    """`data` validated as `model` (`spec_model`'s), a failure as one line naming the field."""
    try:
        spec = model.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{source}: {one_line(error)}") from None
    if spec.categories != "objects365" and not spec.categories_path().exists():
        raise SpecError(f"{source}: categories: file does not exist: {spec.categories}")
    return spec


def load_build_spec(path: str | Path, model: type[BuildSpec]) -> BuildSpec:
    """Read and validate a build spec YAML (a name without a folder looks in the shipped specs)."""
    path = resolve_spec_path(path)
    return parse_build_spec(load_yaml(path), model, source=path.name)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
