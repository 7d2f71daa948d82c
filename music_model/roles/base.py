"""What every role shares: device and dtype choice, model-path resolution, the role base class."""
from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from data_specs.roles import RoleSpec, SpecError, model_kind

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere (CPU half precision is slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def resolve_model_path(model: str) -> str:
    """A hub ID stays as it is; a local path is expanded; `zoo:<name>` becomes the zoo folder,
    built on first use."""
    kind = model_kind(model)
    if kind == "zoo":
        from music_model.zoo import ensure_entry

        return str(ensure_entry(model.removeprefix("zoo:")))
    if kind == "local":
        return str(Path(model).expanduser().resolve())
    return model


def check_options(spec: RoleSpec, known: Sequence[str]) -> None:
    """Fail on an option this backend would ignore, naming it."""
    for name in spec.options:
        if name not in known:
            allowed = ", ".join(known) if known else "none"
            raise SpecError(f"options.{name}: not an option of the {spec.role}/{spec.backend} role (known: {allowed})")


class Role:
    """A loaded model behind a small batched interface. Subclasses load in `__init__`."""

    def __init__(self, spec: RoleSpec):
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.path = resolve_model_path(spec.model)
        # Pipelines and schedulers keep per-call state: shards in other threads take turns on one model.
        self.lock = threading.Lock()

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    def batches(self, n: int):
        """Index ranges of at most `batch_size` items covering `range(n)`."""
        for start in range(0, n, self.batch_size):
            yield range(start, min(start + self.batch_size, n))
