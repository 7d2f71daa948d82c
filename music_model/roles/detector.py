"""The `detector` role: open-vocabulary boxes for given phrases (transformers GroundingDINO).

Each image gets its own phrase list, written as GroundingDINO's prompt `"phrase one. phrase two."`
(lowercased). A box belongs to the phrase it scores highest on over all the phrase's tokens, as
GroundingDINO's grounding evaluation scores a phrase (a normalised positive map: the mean of the
box's token probabilities over the phrase's span; `create_positive_map_from_span` in
IDEA-Research/GroundingDINO), so a token two phrases share ("traffic" in "traffic light" / "traffic
cone") does not decide between them. The assignment is read from the box-token logits, never from
decoded label text.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from data_specs.roles import RoleSpec
from music_model.roles.base import Role
from music_model.roles.base import check_options

BOX_THRESHOLD = 0.35
TEXT_THRESHOLD = 0.25


@dataclass
class Detections:
    """One image's boxes, best first. `boxes` are normalised xyxy in [0, 1]; `phrase_index[i]`
    indexes the image's phrase list and `labels[i]` is that phrase as given."""

    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,) float32
    phrase_index: np.ndarray  # (n,) int64
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), [])


def prompt_for(phrases: Sequence[str], where: str) -> tuple[str, list[tuple[int, int]]]:
    """GroundingDINO's prompt for `phrases` and each phrase's character span in it."""
    text, spans = "", []
    for k, phrase in enumerate(phrases):
        phrase = phrase.strip().lower()
        if not phrase or "." in phrase:
            raise ValueError(f"{where}: phrase {k} ({phrases[k]!r}) must be non-empty and hold no '.', the separator")
        start = len(text)
        text += phrase + ". "
        spans.append((start, start + len(phrase)))
    return text.rstrip(), spans


def phrase_scores(token_probs: np.ndarray, in_phrase: np.ndarray) -> np.ndarray:
    """(queries, phrases): each box's probability for each phrase, its token probabilities
    (queries, tokens) averaged over the phrase's tokens (`in_phrase`: phrases x tokens)."""
    positive_map = in_phrase / np.maximum(in_phrase.sum(axis=1, keepdims=True), 1)
    return token_probs @ positive_map.T


def phrase_token_mask(offsets: np.ndarray, spans: list[tuple[int, int]], width: int) -> np.ndarray:
    """(phrases, width) bool: which token positions of the prompt fall inside each phrase's span.
    `offsets` are the tokenizer's (start, end) character offsets; special and padding tokens have
    empty offsets and belong to no phrase."""
    mask = np.zeros((len(spans), width), dtype=bool)
    for k, (start, end) in enumerate(spans):
        inside = (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
        mask[k, : len(offsets)] = inside
    return mask


class TransformersDetector(Role):
    """Options: `box_threshold` (0.35) on a box's highest token probability over the whole prompt,
    as GroundingDINO filters boxes; `text_threshold` (0.25) that the box's probability for its
    phrase must also pass. A box's score is its probability for its phrase (`phrase_scores`)."""

    def __init__(self, spec: RoleSpec):
        super().__init__(spec)
        check_options(spec, ("box_threshold", "text_threshold"))
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        remote = spec.trust_remote_code
        self.processor = AutoProcessor.from_pretrained(self.path, trust_remote_code=remote, revision=spec.revision)
        self.model = self.load_pretrained(AutoModelForZeroShotObjectDetection, trust_remote_code=remote)
        self.max_text_len = self.model.config.max_text_len
        self.box_threshold = float(spec.options.get("box_threshold", BOX_THRESHOLD))
        self.text_threshold = float(spec.options.get("text_threshold", TEXT_THRESHOLD))

    def detect(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[Sequence[str]],
        box_threshold: float | None = None,
        text_threshold: float | None = None,
    ) -> list[Detections]:
        """Boxes for each image's phrases; an image with no phrases gets no boxes."""
        if len(images) != len(phrases):
            raise ValueError(f"detect: got {len(images)} images but {len(phrases)} phrase lists")
        box_threshold = self.box_threshold if box_threshold is None else box_threshold
        text_threshold = self.text_threshold if text_threshold is None else text_threshold
        prompts = [prompt_for(p, f"detect: image {i}") if p else None for i, p in enumerate(phrases)]
        results = [Detections.empty() for _ in images]
        todo = [i for i, prompt in enumerate(prompts) if prompt]

        def run_batch(batch: range) -> list[Detections]:
            indices = [todo[j] for j in batch]
            return self._detect_batch(
                [images[i] if images[i].mode == "RGB" else images[i].convert("RGB") for i in indices],
                [prompts[i] for i in indices],
                [phrases[i] for i in indices],
                box_threshold,
                text_threshold,
            )

        for i, detections in zip(todo, self.run_batched(len(todo), run_batch)):
            results[i] = detections
        return results

    @torch.inference_mode()
    def _detect_batch(
        self,
        images: list[Image.Image],
        prompts: list[tuple[str, list[tuple[int, int]]]],
        phrases: list[Sequence[str]],
        box_threshold: float,
        text_threshold: float,
    ) -> list[Detections]:
        texts = [text for text, _ in prompts]
        inputs = self.processor(images=images, text=texts, padding="longest", return_offsets_mapping=True, return_tensors="pt")
        offsets = inputs.pop("offset_mapping").numpy()
        if inputs["input_ids"].shape[1] > self.max_text_len:
            raise ValueError(
                f"detect: a prompt is {inputs['input_ids'].shape[1]} tokens, over the model's {self.max_text_len}; "
                "pass fewer phrases per image"
            )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        # logits: (batch, queries, max_text_len), -inf past each prompt's tokens
        probs = outputs.logits.float().sigmoid().cpu().numpy()
        boxes_cxcywh = outputs.pred_boxes.float().cpu().numpy()
        results = []
        for b, ((_, spans), image_phrases) in enumerate(zip(prompts, phrases)):
            in_phrase = phrase_token_mask(offsets[b], spans, probs.shape[2])  # (phrases, tokens)
            phrase_probs = phrase_scores(probs[b], in_phrase)  # (queries, phrases)
            phrase_index = phrase_probs.argmax(axis=1)
            scores = phrase_probs[np.arange(len(phrase_index)), phrase_index]
            keep = (probs[b].max(axis=1) > box_threshold) & (scores > text_threshold)
            kept = np.flatnonzero(keep)[np.argsort(-scores[keep], kind="stable")]
            results.append(
                Detections(
                    boxes=corners(boxes_cxcywh[b][kept]),
                    scores=scores[kept].astype(np.float32),
                    phrase_index=phrase_index[kept].astype(np.int64),
                    labels=[image_phrases[k] for k in phrase_index[kept]],
                )
            )
        return results


def corners(cxcywh: np.ndarray) -> np.ndarray:
    """Normalised (cx, cy, w, h) -> normalised xyxy clipped to [0, 1], float32."""
    cx, cy, w, h = cxcywh.T
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return np.clip(xyxy, 0.0, 1.0).astype(np.float32).reshape(-1, 4)
