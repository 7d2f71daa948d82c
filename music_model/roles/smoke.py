"""Load every role x backend and run one batch of 2 through it: the foundation's end-to-end check,
used by `music roles check`, the tests and the GPU check."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel

from data_specs import load_yaml, shipped
from data_specs.roles import RoleSpec, parse_role_spec
from music_model.roles import load_role
from music_model.roles.structured import bounded_text


class SmokeCaption(BaseModel):
    keep: bool
    caption: bounded_text(60)


def zoo_role_specs(device: str | None = None, dtype: str | None = None) -> dict[str, RoleSpec]:
    """The shipped zoo role specs, optionally moved to another device / dtype."""
    specs = {}
    for name, data in load_yaml(shipped("zoo_roles.yaml")).items():
        data = {**data, **({"device": device} if device else {}), **({"dtype": dtype} if dtype else {})}
        specs[name] = parse_role_spec(data, where=name)
    return specs


def sample_images() -> list[Image.Image]:
    """Two deterministic RGB images of different sizes and aspect ratios."""
    images = []
    for width, height, phase in ((320, 240, 0.0), (224, 288, 1.0)):
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([(x * 255 // width), (y * 255 // height), (((x + y) // 16 % 2) * 200 + phase * 40)], -1)
        images.append(Image.fromarray(pixels.astype(np.uint8), "RGB"))
    return images


def _run_batch(role: Any, spec: RoleSpec, images: list[Image.Image]) -> str:
    kind = spec.role
    if kind == "llm":
        out = role.generate(["Describe a scene with a dog and a chair.", "A cat on a table."], SmokeCaption, [0, 1])
        return f"{sum(r.ok for r in out)}/2 schema-valid"
    if kind == "vlm":
        out = role.generate([[im] for im in images], ["Describe the image.", "Describe it."], SmokeCaption, [0, 1])
        return f"{sum(r.ok for r in out)}/2 schema-valid"
    if kind == "t2i":
        out = role.generate(["a dog on a sofa", "a red car"], [0, 1], width=64, height=64)
        return f"images {[im.size for im in out]}"
    if kind == "editor":
        out = role.edit([im.resize((64, 64)) for im in images], ["turn it around", "side view"], [0, 1])
        return f"images {[im.size for im in out]}"
    if kind == "detector":
        out = role.detect(images, [["dog", "chair"], ["cat"]])
        return f"boxes {[len(d.boxes) for d in out]}"
    if kind == "segmenter":
        boxes = [np.array([[0.1, 0.1, 0.6, 0.7]], np.float32), np.array([[0.2, 0.3, 0.9, 0.8], [0, 0, 1, 1]], np.float32)]
        out = role.segment(images, boxes)
        return f"masks {[m.shape for m in out]}"
    if kind == "clip":
        image_embeddings = role.embed_images(images)
        text_embeddings = role.embed_texts(["a photo of a dog", "a photo of a cat"])
        return f"image {image_embeddings.shape}, text {text_embeddings.shape}"
    if kind == "dino":
        return f"image {role.embed_images(images).shape}"
    raise ValueError(f"no smoke check for role {kind!r}")


def check_roles(specs: dict[str, RoleSpec]) -> list[dict[str, Any]]:
    """Load each spec and run a batch of 2; a failing role is reported, not raised."""
    images = sample_images()
    rows = []
    for name, spec in specs.items():
        row: dict[str, Any] = {"name": name, "role": spec.role, "backend": spec.backend, "model": spec.model}
        try:
            start = time.perf_counter()
            role = load_role(spec)
            row["load_s"] = time.perf_counter() - start
            row["device"], row["dtype"] = str(role.device), str(role.dtype).removeprefix("torch.")
            start = time.perf_counter()
            row["output"] = _run_batch(role, spec, images)
            row["batch_s"] = time.perf_counter() - start
            row["ok"] = True
        except Exception as error:  # a broken role must not hide the state of the others
            row["ok"], row["output"] = False, f"{type(error).__name__}: {error}"
        rows.append(row)
    return rows
