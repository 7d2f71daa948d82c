"""The `editor` role (images, prompts, seeds -> images) through a diffusers pipeline, FLUX.1 Kontext
by default: it re-renders each subject crop in a new view or pose so references are not copies of
the target."""
from __future__ import annotations

from PIL import Image, ImageOps

from music_model.roles.t2i import DiffusersPipelineRole, check_lengths


class DiffusersEditor(DiffusersPipelineRole):
    """Image editing. Options: num_inference_steps (28), guidance_scale (2.5), max_sequence_length
    (512, or the T5 tokenizer's limit when shorter), or any other argument of the pipeline call."""

    OPTION_DEFAULTS = {"num_inference_steps": 28, "guidance_scale": 2.5, "max_sequence_length": 512}

    def edit(
        self,
        images: list[Image.Image],
        prompts: list[str],
        seeds: list[int],
        width: int | None = None,
        height: int | None = None,
    ) -> list[Image.Image]:
        """The i-th image edited by the i-th prompt from seed `seeds[i]`.

        The output is `width` x `height`; a size left out is the input's, rounded to the nearest
        multiple the pipeline needs. The input is scaled and centre-cropped to the output size
        (aspect kept), so the pipeline conditions on exactly the geometry it renders.
        """
        count = check_lengths(images=images, prompts=prompts, seeds=seeds)
        sizes = [
            self.check_size(
                self.round_size(image.width) if width is None else width,
                self.round_size(image.height) if height is None else height,
            )
            for image in images
        ]

        # One pipeline call renders one size: batch within groups of equal output size.
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(size, []).append(index)
        edited: list[Image.Image | None] = [None] * count
        for (out_width, out_height), indices in groups.items():

            def run_batch(batch: range) -> list[Image.Image]:
                chosen = [indices[j] for j in batch]
                fitted = [
                    ImageOps.fit(images[i].convert("RGB"), (out_width, out_height), Image.Resampling.BICUBIC)
                    for i in chosen
                ]
                return self.run(
                    [seeds[i] for i in chosen],
                    image=fitted,
                    prompt=[prompts[i] for i in chosen],
                    width=out_width,
                    height=out_height,
                    **self._keep_size(out_width, out_height),
                )

            for i, output in zip(indices, self.run_batched(len(indices), run_batch)):
                edited[i] = output
        return edited

    def _keep_size(self, width: int, height: int) -> dict:
        """Kontext rescales to ~1024² and snaps its input to preferred resolutions unless told not to."""
        arguments = {}
        if self.accepts("max_area"):
            arguments["max_area"] = width * height
        if self.accepts("_auto_resize"):
            arguments["_auto_resize"] = False
        return arguments
