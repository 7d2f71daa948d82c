"""The MUSIC renderer: FLUX.1 Kontext (diffusers `FluxKontextPipeline`, through the `editor` role's
loader) conditioned on a *layout canvas*: each subject's reference image pasted into the box of
its layout cells on a plain canvas, with the CoT-enriched prompt.

Why this design:
- Kontext is a maintained diffusers pipeline that already attends to a conditioning image as
  in-context tokens (its latents concatenated to the noisy latents, with their own position IDs),
  and keeps where things are in it. A canvas that puts each reference where the layout says is
  the layout conditioning it understands natively: no extra adapter, no change to the pipeline.
- It takes any number of subjects (1-12) in one image, where region-masked image-prompt adapters
  need one image embedding and one mask per subject and a pipeline patch to combine them.
- It is the editor the data pipeline already uses (rerender stage), with a tiny twin in the zoo
  (`zoo:flux_kontext`), so the real loading code path is the tested one.
- Its LoRA trains with its own rectified-flow objective (`flow_matching_loss`, as diffusers'
  `train_dreambooth_lora_flux_kontext.py`), the canvas as the conditioning image and the sample's
  image as the target.

Canvas rule: a subject's box is the bounding box of its cells; its reference is scaled to fit the
box (aspect kept) and centred in it; subjects are pasted largest box first, so a small subject
whose box overlaps a larger one stays visible. Cells are in the grid of the layout over the canvas.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps

from music_model.music.plan import Plan
from music_model.subjects.decimate import SUBJECT_TOKEN

BACKGROUND = (255, 255, 255)
MAX_PROMPT_CHARS = 1500  # well inside FLUX's 512 T5 tokens


def subject_box(plan: Plan, subject_id: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of a subject's cells on a width x height canvas."""
    cells = plan.cells(subject_id)
    if not cells:
        raise ValueError(f"subject {subject_id} has no layout cell")
    grid = plan.grid
    rows = [c // grid for c in cells]
    cols = [c % grid for c in cells]
    left, right = round(min(cols) * width / grid), round((max(cols) + 1) * width / grid)
    top, bottom = round(min(rows) * height / grid), round((max(rows) + 1) * height / grid)
    return left, top, right, bottom


def layout_canvas(references: Sequence[Image.Image], plan: Plan, width: int, height: int,
                  background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """The conditioning image: reference k (subject k+1) pasted into its cells' box (module rule)."""
    if len(references) != plan.n_subjects:
        raise ValueError(f"{len(references)} reference images for a plan of {plan.n_subjects} subjects")
    canvas = Image.new("RGB", (width, height), background)
    boxes = {s: subject_box(plan, s, width, height) for s in range(1, plan.n_subjects + 1)}
    for subject in sorted(boxes, key=lambda s: -(boxes[s][2] - boxes[s][0]) * (boxes[s][3] - boxes[s][1])):
        left, top, right, bottom = boxes[subject]
        fitted = ImageOps.contain(references[subject - 1].convert("RGB"), (right - left, bottom - top), Image.Resampling.BICUBIC)
        canvas.paste(fitted, (left + (right - left - fitted.width) // 2, top + (bottom - top - fitted.height) // 2))
    return canvas


def name_subjects(text: str, categories: Sequence[str | None]) -> str:
    """`<sN>` tags replaced by their category (the tag stays when the category is unknown)."""
    def name(match) -> str:
        k = int(match.group(1))
        return categories[k - 1] if 1 <= k <= len(categories) and categories[k - 1] else match.group(0)

    return SUBJECT_TOKEN.sub(name, text)


def render_prompt(instruction: str, plan: Plan, categories: Sequence[str | None]) -> str:
    """The CoT-enriched prompt: the instruction, then each subject's role and placement, then the
    relations, with subject tags named by category."""
    parts = [name_subjects(instruction.strip(), categories).rstrip(".") + "."]
    for note in plan.subjects:
        who = categories[note.id - 1] if note.id <= len(categories) and categories[note.id - 1] else f"subject {note.id}"
        parts.append(f"The {who}: {name_subjects(note.role, categories)}, {name_subjects(note.placement, categories)}.")
    parts += [name_subjects(relation, categories).rstrip(".") + "." for relation in plan.relations]
    return " ".join(parts)[:MAX_PROMPT_CHARS]


def quiet_prompt_truncation(pipeline) -> None:
    """The CoT-enriched prompt is longer than CLIP's 77 tokens by design: CLIP (the pooled embedding)
    reads its first 77 tokens, the instruction; T5 reads all of it. The pipeline would warn on every
    call, so its module's logger shows errors only, and transformers' "Token indices sequence length
    is longer ... will result in indexing errors" (the pipeline truncates: no such error) is dropped.
    `note_clip_cut` says it once, in our words."""
    import logging

    from music_model.noise import drop_log, verbose

    if not verbose():
        logging.getLogger(type(pipeline).__module__).setLevel(logging.ERROR)
    drop_log("transformers.tokenization_utils_base", "Token indices sequence length is longer than the specified maximum")


_noted_cuts: set[str] = set()


def note_clip_cut(pipeline, prompts: Sequence[str], stage: str) -> None:
    """One line per process and `stage`, the first time prompts run past CLIP's window: how many,
    and the start of what CLIP does not see."""
    import logging

    tokenizer = getattr(pipeline, "tokenizer", None)
    if stage in _noted_cuts or tokenizer is None:
        return
    limit = tokenizer.model_max_length
    ids = tokenizer(list(prompts), verbose=False)["input_ids"]
    cut = [row for row in ids if len(row) > limit]
    if not cut:
        return
    _noted_cuts.add(stage)
    unseen = tokenizer.decode(cut[0][limit - 1:], skip_special_tokens=True)
    logging.getLogger(__name__).warning(
        f"{stage}: renderer prompts run past CLIP's {limit} tokens ({len(cut)} of the first {len(ids)}, up to "
        f"{max(map(len, cut))}); T5 reads them whole, CLIP misses e.g. \"{unseen[:60]}{'...' if len(unseen) > 60 else ''}\" "
        "(said once)")


class Renderer:
    """The renderer model: a loaded `editor` role (FluxKontextPipeline) drawing from layout canvases."""

    def __init__(self, editor, background: tuple[int, int, int] = BACKGROUND):
        self.editor = editor
        self.background = background
        quiet_prompt_truncation(editor.pipeline)

    @classmethod
    def load(cls, spec, adapter: str | Path | None = None, fuse: bool = True,
             background: tuple[int, int, int] = BACKGROUND) -> "Renderer":
        """The renderer of an `editor` role spec. With `adapter` (a LoRA folder in diffusers' format,
        as training saves it) the pipeline is a private copy, not the cached role's, with the adapter
        loaded and, with `fuse`, merged into the transformer's weights."""
        from music_model.noise import drop_log
        from music_model.roles import load_role
        from music_model.roles.editor import DiffusersEditor

        if adapter is None:
            return cls(load_role(spec), background)
        editor = DiffusersEditor(spec)
        # Training adapts the transformer only: no text-encoder keys is the expected case, not a problem.
        drop_log("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel")
        editor.pipeline.load_lora_weights(str(adapter), adapter_name="music")
        if fuse:
            editor.pipeline.fuse_lora(adapter_names=["music"])
            editor.pipeline.unload_lora_weights()
        return cls(editor, background)

    def inputs(self, references: Sequence[Sequence[Image.Image]], plans: Sequence[Plan], instructions: Sequence[str],
               categories: Sequence[Sequence[str | None]], width: int, height: int) -> tuple[list[Image.Image], list[str]]:
        """Each sample's layout canvas and CoT-enriched prompt."""
        count = len(plans)
        if not count == len(references) == len(instructions) == len(categories):
            raise ValueError(f"one entry per sample expected: {len(references)} reference lists, {count} plans, "
                             f"{len(instructions)} instructions, {len(categories)} category lists")
        width, height = self.editor.check_size(width, height)
        canvases = [layout_canvas(refs, plan, width, height, self.background) for refs, plan in zip(references, plans)]
        prompts = [render_prompt(i, p, c) for i, p, c in zip(instructions, plans, categories)]
        note_clip_cut(self.editor.pipeline, prompts, "generate")
        return canvases, prompts

    def render(self, references: Sequence[Sequence[Image.Image]], plans: Sequence[Plan], instructions: Sequence[str],
               categories: Sequence[Sequence[str | None]], seeds: Sequence[int], width: int, height: int) -> list[Image.Image]:
        """One width x height image per sample, from its layout canvas and CoT-enriched prompt."""
        if len(seeds) != len(plans):
            raise ValueError(f"one entry per sample expected: {len(plans)} plans, {len(seeds)} seeds")
        canvases, prompts = self.inputs(references, plans, instructions, categories, width, height)
        width, height = self.editor.check_size(width, height)
        with self.editor.lock:
            return self.editor.edit(canvases, prompts, [int(s) for s in seeds], width=width, height=height)


def flow_matching_loss(pipeline, targets: torch.Tensor, conditions: torch.Tensor, prompts: Sequence[str],
                       generator: torch.Generator, device: torch.device, dtype: torch.dtype, guidance_scale: float = 1.0,
                       max_sequence_length: int = 512, weighting_scheme: str = "none", logit_mean: float = 0.0,
                       logit_std: float = 1.0) -> torch.Tensor:
    """FLUX Kontext's rectified-flow training loss for one batch, as diffusers'
    `train_dreambooth_lora_flux_kontext.py` computes it: targets and conditioning images (B, 3, H, W
    in [-1, 1]) to VAE latents (mode, shifted and scaled), a timestep per sample from the density
    scheme, x_t = (1 - sigma) x_0 + sigma noise, the conditioning latents appended to the sequence
    with position IDs marked 1, and the MSE between the predicted and true velocity (noise - x_0)
    on the target tokens (the script's weighting schemes `none` and `logit_normal` weight every
    sample 1). Noise and timesteps come from `generator` (CPU) so a step is reproducible on any
    device; `dtype` is the pipeline's weight dtype (LoRA weights may be float32 beside it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    transformer, vae = pipeline.transformer, pipeline.vae
    batch = targets.shape[0]
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipeline.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                                                 max_sequence_length=max_sequence_length)
        shift, scale = vae.config.shift_factor, vae.config.scaling_factor
        latents = (vae.encode(targets.to(device, vae.dtype)).latent_dist.mode() - shift) * scale
        condition = (vae.encode(conditions.to(device, vae.dtype)).latent_dist.mode() - shift) * scale
    latents, condition = latents.to(dtype), condition.to(dtype)
    channels, height, width = latents.shape[1:]
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)  # its training schedule, untouched by inference
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device, dtype)
    u = compute_density_for_timestep_sampling(weighting_scheme, batch, logit_mean, logit_std, mode_scale=1.29, generator=generator)
    indices = (u * scheduler.config.num_train_timesteps).long().clamp_max(scheduler.config.num_train_timesteps - 1)
    timesteps = scheduler.timesteps[indices].to(device)
    sigmas = scheduler.sigmas[indices].to(device, dtype).view(batch, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    pack = type(pipeline)._pack_latents
    packed = pack(noisy, batch, channels, height, width)
    packed_condition = pack(condition, batch, channels, condition.shape[2], condition.shape[3])
    ids = type(pipeline)._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
    condition_ids = type(pipeline)._prepare_latent_image_ids(batch, condition.shape[2] // 2, condition.shape[3] // 2, device, dtype)
    condition_ids[..., 0] = 1
    guidance = torch.full((batch,), guidance_scale, device=device, dtype=torch.float32) if transformer.config.guidance_embeds else None
    prediction = transformer(
        hidden_states=torch.cat([packed, packed_condition], dim=1),
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=torch.cat([ids, condition_ids], dim=0),
        return_dict=False,
    )[0][:, : packed.shape[1]]
    velocity = pack(noise - latents, batch, channels, height, width)
    return torch.mean((prediction.float() - velocity.float()) ** 2)
