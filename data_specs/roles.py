"""Role specs: which model serves a role, through which backend, on which device.

A role spec is declarative and validated here, before any model library is imported: an unknown
backend, a missing local path, a bad dtype or a non-positive batch size fail with one line that
names the field.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The one backend table: (role, backend) -> the "module:Class" that loads it. Spec validation reads
# the pairs; the registry imports the class lazily, so a CPU-only stage never imports diffusers.
# A new backend is its class and one line here.
BACKENDS: dict[tuple[str, str], str] = {
    ("llm", "transformers"): "music_model.roles.llm:TransformersLLM",
    ("vlm", "transformers"): "music_model.roles.vlm:TransformersVLM",
    ("t2i", "diffusers"): "music_model.roles.t2i:DiffusersT2I",
    ("editor", "diffusers"): "music_model.roles.editor:DiffusersEditor",
    ("detector", "transformers"): "music_model.roles.detector:TransformersDetector",
    ("segmenter", "transformers"): "music_model.roles.segmenter:TransformersSegmenter",
    ("segmenter", "segment_anything"): "music_model.roles.segmenter:SegmentAnythingSegmenter",
    ("clip", "transformers"): "music_model.roles.clip:TransformersClip",
    ("clip", "open_clip"): "music_model.roles.clip:OpenClipClip",
    ("dino", "transformers"): "music_model.roles.dino:TransformersDino",
}
ROLE_BACKENDS: dict[str, tuple[str, ...]] = {
    role: tuple(backend for r, backend in BACKENDS if r == role) for role in dict.fromkeys(r for r, _ in BACKENDS)
}
Role = Literal["llm", "vlm", "t2i", "editor", "detector", "segmenter", "clip", "dino"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Offload = Literal["none", "model", "sequential"]

# A hub ID is `name` or `org/name` (open_clip also takes `hf-hub:org/name`); anything that starts
# like a path is a local path and must exist.
_HUB_ID = re.compile(r"^(hf-hub:)?[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_GIT_REF = re.compile(r"^[\w.\-/]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class SpecError(ValueError):
    """A spec that cannot run; the message is one line naming the offending field."""


def model_kind(model: str) -> Literal["zoo", "arch", "local", "hub"]:
    """`arch:<name>`: the real architecture with random weights, built on the device (benchmarks, planning)."""
    if model.startswith("zoo:"):
        return "zoo"
    if model.startswith("arch:"):
        return "arch"
    if model.startswith(("/", "./", "../", "~")) or Path(model).exists():
        return "local"
    return "hub"


class RoleSpec(BaseModel):
    """One model role: `{role, backend, model, dtype, device, batch_size, options}`.

    `model` is a hub ID, a local path, `zoo:<name>` or `arch:<name>`. `options` carries backend
    keyword arguments (inference steps, max new tokens, thresholds) that are part of the cache key.
    `revision` (hub models only) is a branch, tag or commit of the hub repository; preflight
    resolves it to a commit, which the build records and loads (a 40-hex commit pins it for good).
    `offload` is for GPUs the model does not fit: `model` (diffusers' model CPU offload; accelerate's
    device_map for transformers) or `sequential` (diffusers' sequential offload: least memory, slowest).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    backend: str
    model: str = Field(min_length=1)
    revision: str | None = None
    dtype: DType = "auto"
    device: str = "auto"
    batch_size: int = 4
    trust_remote_code: bool = False
    offload: Offload = "none"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive integer, got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        kind = model_kind(value)
        if kind in ("zoo", "arch") and not re.fullmatch(r"(zoo|arch):[\w.\-]+", value):
            raise ValueError(f"{kind} model must look like {kind}:<name>, got {value!r}")
        if kind == "local" and not Path(value).expanduser().exists():
            raise ValueError(f"local path does not exist: {value}")
        if kind == "hub" and not _HUB_ID.match(value):
            raise ValueError(f"not a hub ID, local path or zoo:<name>: {value!r}")
        return value

    @field_validator("revision")
    @classmethod
    def _git_ref(cls, value: str | None) -> str | None:
        if value is not None and not _GIT_REF.match(value):
            raise ValueError(f"must be a branch, tag or commit of the hub repository, got {value!r}")
        return value

    @property
    def pinned(self) -> bool:
        """The revision is a commit, so what the role loads can never change."""
        return self.revision is not None and bool(_COMMIT.match(self.revision))

    @model_validator(mode="after")
    def _revision_of_hub_model(self) -> "RoleSpec":
        if self.revision is not None and model_kind(self.model) != "hub":
            raise ValueError(f"revision: only a hub model has revisions; {self.model!r} is a {model_kind(self.model)} model")
        return self

    @model_validator(mode="after")
    def _backend_serves_role(self) -> "RoleSpec":
        allowed = ROLE_BACKENDS[self.role]
        if self.backend not in allowed:
            raise ValueError(
                f"backend: {self.backend!r} cannot serve role {self.role!r}; use one of {', '.join(allowed)}"
            )
        return self

    def cache_key(self) -> str:
        return self.model_dump_json()


def one_line(error: ValidationError, prefix: str = "") -> str:
    """The first validation error as `field.path: message`."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
    message = first["msg"].removeprefix("Value error, ")
    for field in ("backend", "revision"):  # raised by a model validator, which pydantic locates at the root
        if message.startswith(f"{field}: "):
            loc = ".".join(p for p in (loc, field) if p)
            message = message.removeprefix(f"{field}: ")
    return f"{loc}: {message}" if loc else message


def parse_role_spec(data: dict[str, Any], where: str = "") -> RoleSpec:
    """Validate a role spec, raising SpecError with one line that names the field."""
    try:
        return RoleSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(one_line(error, where)) from None
