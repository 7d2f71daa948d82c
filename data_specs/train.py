"""The training spec of the MUSIC model (planner + renderer LoRA), with the paper's defaults: LoRA rank
64, alpha 64, learning rate 1e-4, 10 epochs, loss 0.5 text cross-entropy + 0.5 image loss. The same
file says how the trained model generates (Pass@N candidates, seeds, selector), what it is evaluated
on, and what the parent pipeline rebuilds first.

A bad spec fails in `load_train_spec` before any model loads, with one line that names the field.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_specs import load_yaml, resolve_spec_path
from data_specs.build import canonical_json
from data_specs.roles import RoleSpec, SpecError, one_line

# Qwen2.5-VL's language-model projections (the vision tower stays frozen and un-adapted).
PLANNER_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# FLUX transformer attention and feed-forward projections, as diffusers' FLUX LoRA scripts adapt them.
RENDERER_LORA_TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]
# Fields that may change between a checkpoint and its resumption (they do not change what a step computes).
RESUMABLE_CHANGES = ("max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "generation", "evaluation", "pipeline",
                     "output_root")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraParams(_Section):
    rank: int = Field(64, ge=1)
    alpha: float = Field(64, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    planner_targets: str = Field(PLANNER_LORA_TARGETS, description="regex over module names (peft target_modules)")
    renderer_targets: list[str] = Field(default_factory=lambda: list(RENDERER_LORA_TARGETS), min_length=1)


class OptimParams(_Section):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up, then constant")
    max_grad_norm: float | None = Field(1.0, gt=0, description="global gradient-norm clip over both adapters (null: none)")


class LossWeights(_Section):
    planner: float = Field(0.5, ge=0, description="weight of the planner's cross-entropy on CoT + layout tokens")
    renderer: float = Field(0.5, ge=0, description="weight of the renderer's flow-matching loss")

    @model_validator(mode="after")
    def _some(self) -> "LossWeights":
        if self.planner == 0 and self.renderer == 0:
            raise ValueError("both weights are 0: nothing would train")
        return self


class PlanParams(_Section):
    """The plan text's grid and the bounds of generated plan texts (music_model.music.plan.PlanBounds)."""

    grid: int = Field(8, ge=2, le=32)
    max_relations: int = Field(6, ge=0, le=32)
    max_field_words: int = Field(12, ge=1, le=64)
    max_word_chars: int = Field(24, ge=1, le=64)
    max_seq_len: int = Field(4096, ge=16, description="training: a longer planner example (prompt + images + plan) is skipped")


class RenderParams(_Section):
    width: int = Field(1024, ge=16)
    height: int = Field(1024, ge=16)
    background: int = Field(255, ge=0, le=255, description="grey level of the layout canvas")
    guidance_scale: float = Field(1.0, ge=0, description="training: the distilled-guidance input, as diffusers' Kontext LoRA script")
    weighting_scheme: Literal["none", "logit_normal", "mode"] = "none"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    max_sequence_length: int = Field(512, ge=16, le=512, description="T5 prompt tokens")


class GenerateParams(_Section):
    candidates: int = Field(4, ge=1, le=64, description="Pass@N: candidates per case")
    seed: int = 0
    selector: Literal["clip_t", "identity_aware"] = "clip_t"
    shard_size: int = Field(8, ge=1, description="cases (or DreamBench subjects) per generation task run")
    # Pass@N below linear cost (music_model/music/model.py): `full` renders all N (the paper's);
    # `screen` renders the `screen_keep` best plans; `prune` stops the worst half of the rendering
    # candidates after each step in `prune_at`; `screen_prune` does both.
    strategy: Literal["full", "screen", "prune", "screen_prune"] = "full"
    screen_keep: int = Field(2, ge=1, le=64, description="screen: plans rendered per case")
    prune_at: list[int] = Field(default_factory=lambda: [0], description="prune: 0-based denoising steps after which to halve")
    prune_fraction: float = Field(0.5, gt=0, lt=1, description="prune: share of the live candidates kept at each prune step")

    @field_validator("prune_at")
    @classmethod
    def _prune_steps(cls, value: list[int]) -> list[int]:
        if any(step < 0 for step in value) or len(set(value)) != len(value):
            raise ValueError(f"must be distinct denoising step indices >= 0, got {value}")
        return sorted(value)


class EvaluationParams(_Section):
    eval_spec: str = Field("eval_tiny.yaml", description="scoring spec (data_specs/eval.py); a bare name is a shipped one")
    msic: str | None = Field(None, description="MSIC benchmark: its folder (with data/*.parquet) or cases Parquet")
    dreambench: bool = True
    dreambench_subjects: list[str] | None = None
    dreambench_prompts: list[int] | None = Field(None, description="prompt indices 0..24 (default: all)")


class PipelineParams(_Section):
    build_spec: str = Field(description="training-set build spec rebuilt first (a bare name is a shipped one)")
    msic_spec: str | None = Field(None, description="MSIC build spec regenerated and checked against the training set")


class TrainSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.\-]*$")
    output_root: str = "out/train"
    seed: int = 0
    dataset: str | None = Field(None, description="published training set folder (data/*.parquet); the pipeline fills it")
    planner: RoleSpec
    renderer: RoleSpec
    plan: PlanParams = PlanParams()
    render: RenderParams = RenderParams()
    lora: LoraParams = LoraParams()
    optim: OptimParams = OptimParams()
    loss_weights: LossWeights = LossWeights()
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(4, ge=1, description="micro-batches per optimizer step")
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    gradient_checkpointing: bool = False
    cudnn_attention: bool = Field(False, description="let PyTorch's cuDNN SDPA kernels run while training on CUDA (off: their "
                                  "backward has open NaN / out-of-bounds bugs on H100/H200, pytorch#196678, #169849)")
    generation: GenerateParams = GenerateParams()
    evaluation: EvaluationParams = EvaluationParams()
    pipeline: PipelineParams | None = None

    @model_validator(mode="before")
    @classmethod
    def _roles(cls, data: Any) -> Any:
        # The planner is a vlm role and the renderer an editor role: specs need not say so.
        if isinstance(data, dict):
            data = dict(data)
            for key, role in (("planner", "vlm"), ("renderer", "editor")):
                if isinstance(data.get(key), dict):
                    data[key] = {"role": role, **data[key]}
        return data

    @model_validator(mode="after")
    def _role_kinds(self) -> "TrainSpec":
        if self.planner.role != "vlm":
            raise ValueError(f"planner: must be a vlm role, got {self.planner.role}")
        if self.renderer.role != "editor":
            raise ValueError(f"renderer: must be an editor role, got {self.renderer.role}")
        steps = self.renderer.options.get("num_inference_steps", 28)  # the editor role's default (music_model.roles.editor)
        late = [step for step in self.generation.prune_at if step >= steps - 1]
        if self.generation.strategy in ("prune", "screen_prune") and late:
            raise ValueError(f"generation.prune_at: step {late[0]} leaves nothing to save: the renderer runs {steps} steps (0..{steps - 1})")
        return self

    def out_dir(self) -> Path:
        return (Path(self.output_root).expanduser() / self.name).resolve()

    def dataset_dir(self) -> Path:
        if not self.dataset:
            raise SpecError("dataset: not set (a published training set folder, e.g. out/tiny/dataset)")
        folder = Path(self.dataset).expanduser()
        if not sorted((folder / "data").glob("*.parquet")):
            raise SpecError(f"dataset: no published Parquet under {folder / 'data'}")
        return folder.resolve()

    def step_hash(self) -> str:
        """Hash of what decides every training step's computation; a checkpoint resumes only under it."""
        content = self.model_dump(mode="json", exclude=set(RESUMABLE_CHANGES))
        content["dataset"] = str(Path(content["dataset"]).expanduser().resolve()) if content["dataset"] else None
        return hashlib.sha256(canonical_json(content).encode()).hexdigest()[:16]


def parse_train_spec(data: Any, source: str = "spec") -> TrainSpec:
    try:
        return TrainSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{source}: {one_line(error)}") from None


def load_train_spec(path: str | Path) -> TrainSpec:
    """Read and validate a training spec YAML (a bare file name also looks in the shipped specs)."""
    path = resolve_spec_path(path)
    return parse_train_spec(load_yaml(path), source=path.name)
