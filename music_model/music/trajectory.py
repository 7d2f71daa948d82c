"""Pass@N below linear cost: the renderer's denoising driven step by step, so a candidate's predicted
clean image can be scored at chosen steps and the worst candidates stopped there.

The loop follows diffusers 0.42.1 `FluxKontextPipeline.__call__`
(`diffusers/pipelines/flux/pipeline_flux_kontext.py`: steps 1-6 and the final decode) and calls
the pipeline's own components and helpers (`encode_prompt`, `image_processor`, `prepare_latents`,
`calculate_shift`, `retrieve_timesteps`, the transformer, `scheduler.step`, `_unpack_latents`, the
VAE). It stops the loop between steps, which the pipeline's `callback_on_step_end` cannot do for
one row of a batch.

Bits: every candidate is denoised in a batch of its own (its own prompt encoding, latents,
scheduler and decode). On CPU float32 a FLUX transformer row's bits depend on which rows share its
batch (matmul blocking), so a survivor run together with whichever others survived would not be
the same bits as its full render; a batch of one is, and it is the same computation as the
pipeline called on that candidate alone (`tests/test_passn_budget.py` checks both). `full` keeps
today's batched pipeline call and so today's bytes.

The predicted clean latents of flow matching at step t are x0 = x_t - sigma_t * v (v the
transformer's velocity); they are decoded like a final image and scored by the selector.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from PIL import Image, ImageOps


@dataclass
class Ledger:
    """What a case's generation spent, counted as it ran."""

    plans: int = 0
    denoise_steps: int = 0  # transformer calls, one candidate each
    latent_token_steps: int = 0  # sum over those calls of the latent tokens denoised
    decodes: int = 0  # VAE decodes: finals and predicted clean images
    selector_calls: int = 0  # images the selector scored
    renders: int = 0  # candidates denoised to their last step
    model_seconds: float = 0.0

    def add(self, other: "Ledger") -> "Ledger":
        return Ledger(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def record(self) -> dict:
        return asdict(self) | {"model_seconds": round(self.model_seconds, 4)}


# A selector scores images against texts (higher is better); the model never sees the judge.
Selector = Callable[[Sequence[Image.Image], Sequence[str]], Sequence[float]]


@dataclass
class _State:
    latents: torch.Tensor
    image_latents: torch.Tensor
    ids: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    scheduler: object
    timesteps: torch.Tensor


class Trajectories:
    """Step-wise denoising of single candidates with the editor role's FluxKontextPipeline and its
    call options (steps, guidance, sequence length)."""

    def __init__(self, editor):
        self.editor = editor
        self.pipeline = editor.pipeline
        options = editor.call_options
        self.steps = int(options.get("num_inference_steps", 28))
        self.guidance_scale = float(options.get("guidance_scale", 3.5))
        self.max_sequence_length = int(options.get("max_sequence_length", 512))
        unknown = sorted(set(options) - {"num_inference_steps", "guidance_scale", "max_sequence_length"})
        if unknown:
            raise ValueError(f"renderer options {unknown}: step-wise rendering follows steps, guidance and sequence length only")

    def start(self, canvas: Image.Image, prompt: str, seed: int, width: int, height: int) -> _State:
        """Steps 3-5 of the pipeline call for one candidate (prompt, conditioning, noise, schedule)."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift, retrieve_timesteps

        import numpy as np

        pipe = self.pipeline
        device = pipe._execution_device
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=device, num_images_per_prompt=1,
                                                             max_sequence_length=self.max_sequence_length)
        # The editor role's fit, then the pipeline's own resize and preprocessing at the output size.
        image = ImageOps.fit(canvas.convert("RGB"), (width, height), Image.Resampling.BICUBIC)
        multiple = pipe.vae_scale_factor * 2
        w, h = round((width * height * width / height) ** 0.5), round((width * height * height / width) ** 0.5)
        w, h = w // multiple * multiple, h // multiple * multiple
        image_w, image_h = pipe.image_processor.get_default_height_width(image)
        image_w, image_h = image_w // multiple * multiple, image_h // multiple * multiple
        image = pipe.image_processor.preprocess(pipe.image_processor.resize(image, image_h, image_w), image_h, image_w)
        generator = [torch.Generator("cpu").manual_seed(int(seed))]
        latents, image_latents, ids, image_ids = pipe.prepare_latents(image, 1, pipe.transformer.config.in_channels // 4, h, w,
                                                                      prompt_embeds.dtype, device, generator, None)
        ids = torch.cat([ids, image_ids], dim=0)
        scheduler = copy.deepcopy(pipe.scheduler)
        mu = calculate_shift(latents.shape[1], scheduler.config.get("base_image_seq_len", 256), scheduler.config.get("max_image_seq_len", 4096),
                             scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / self.steps, self.steps)
        timesteps, _ = retrieve_timesteps(scheduler, self.steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return _State(latents, image_latents, ids, prompt_embeds, pooled, text_ids, scheduler, timesteps)

    def step(self, state: _State, i: int) -> torch.Tensor:
        """Denoising step i (step 6 of the pipeline call); returns the predicted clean latents x0."""
        pipe = self.pipeline
        t = state.timesteps[i]
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], self.guidance_scale, device=state.latents.device, dtype=torch.float32).expand(state.latents.shape[0])
        velocity = pipe.transformer(
            hidden_states=torch.cat([state.latents, state.image_latents], dim=1),
            timestep=t.expand(state.latents.shape[0]).to(state.latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=state.pooled,
            encoder_hidden_states=state.prompt_embeds,
            txt_ids=state.text_ids,
            img_ids=state.ids,
            joint_attention_kwargs={},
            return_dict=False,
        )[0][:, : state.latents.size(1)]
        clean = state.latents - state.scheduler.sigmas[i].to(state.latents.device, state.latents.dtype) * velocity
        state.latents = state.scheduler.step(velocity, t, state.latents, return_dict=False)[0]
        return clean

    def decode(self, latents: torch.Tensor, width: int, height: int) -> Image.Image:
        """The pipeline's final decode of packed latents to an RGB image."""
        pipe = self.pipeline
        unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(unpacked, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0].convert("RGB")

    def run(self, canvases: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int], width: int, height: int,
            checkpoints: Sequence[int] = (), keep: Callable[[int, list[int], list[float]], list[int]] | None = None,
            selector: Selector | None = None, selector_texts: Sequence[str] | None = None) -> tuple[list[Image.Image | None], dict, Ledger]:
        """Denoise the candidates of one case together, step by step. After each step in
        `checkpoints` (0-based; the step's own x0), the selector scores every live candidate's
        predicted clean image against its `selector_texts` entry, and `keep(step, live, scores)`
        names the candidates that go on. Returns the final images (None for a stopped candidate),
        the scores {step: {candidate: score}} and the ledger."""
        if checkpoints and selector is None:
            raise ValueError("checkpoints need a selector to score the predicted clean images")
        ledger = Ledger()
        started = time.perf_counter()
        with self.editor.lock, torch.inference_mode():
            states = [self.start(c, p, s, width, height) for c, p, s in zip(canvases, prompts, seeds)]
            live = list(range(len(states)))
            scores: dict[int, dict[int, float]] = {}
            for i in range(self.steps):
                cleans = {}
                for k in live:
                    cleans[k] = self.step(states[k], i)
                    ledger.denoise_steps += 1
                    ledger.latent_token_steps += int(states[k].latents.shape[1])
                if i in checkpoints and i < self.steps - 1:
                    previews = [self.decode(cleans[k], width, height) for k in live]
                    ledger.decodes += len(previews)
                    values = [float(v) for v in selector(previews, [selector_texts[k] for k in live])]
                    ledger.selector_calls += len(previews)
                    scores[i] = dict(zip(live, values))
                    if keep is not None:
                        live = sorted(keep(i, list(live), values))
            images: list[Image.Image | None] = [None] * len(states)
            for k in live:
                images[k] = self.decode(states[k].latents, width, height)
                ledger.decodes += 1
                ledger.renders += 1
        ledger.model_seconds = time.perf_counter() - started
        return images, scores, ledger

