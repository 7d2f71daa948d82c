"""What every role shares: device and dtype choice, loading straight onto the device, batching
that halves on out-of-memory, release, the role base class."""
from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from data_specs.roles import RoleSpec, SpecError, model_kind
from music_model.roles.slots import current_device

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_thread = threading.local()


def resolve_device(device: str) -> torch.device:
    """`auto` is the device of the slot this thread holds, else the first CUDA device when there
    is one, else the CPU."""
    if device == "auto":
        return torch.device(current_device() or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere (CPU half precision is slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def resolve_model_path(model: str) -> str:
    """A hub ID stays as it is; a local path is expanded; `zoo:<name>` becomes the zoo folder,
    built on first use; `arch:<name>` a folder of the real architecture's configs (no weights)."""
    kind = model_kind(model)
    if kind == "zoo":
        from music_model.zoo import ensure_entry

        return str(ensure_entry(model.removeprefix("zoo:")))
    if kind == "arch":
        from music_model.zoo.arch import ensure_arch

        return str(ensure_arch(model.removeprefix("arch:")))
    if kind == "local":
        return str(Path(model).expanduser().resolve())
    return model


def check_options(spec: RoleSpec, known: Sequence[str]) -> None:
    """Fail on an option this backend would ignore, naming it."""
    for name in spec.options:
        if name not in known:
            allowed = ", ".join(known) if known else "none"
            raise SpecError(f"options.{name}: not an option of the {spec.role}/{spec.backend} role (known: {allowed})")


def thread_oom_retries() -> int:
    """Batches this thread has halved after an out-of-memory error since the process started."""
    return getattr(_thread, "oom_retries", 0)


class OutOfMemory(RuntimeError):
    """A batch of one item does not fit: the message names the role, the model and the device's memory."""


def device_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device}"
    free, total = torch.cuda.mem_get_info(device)
    return (f"{device}: {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB allocated by this process, "
            f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")


def free_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory(device: str | None) -> None:
    if device and device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: str | None) -> int | None:
    """The most accelerator memory allocated on `device` since `reset_peak_memory`; None off CUDA."""
    if device and device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    return None


class Role:
    """A loaded model behind a small batched interface. Subclasses load in `__init__`, through
    `load_pretrained` / `load_pipeline`, which put the weights straight on the role's device."""

    def __init__(self, spec: RoleSpec):
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.path = resolve_model_path(spec.model)
        self.random_weights = model_kind(spec.model) == "arch"
        if spec.offload != "none" and self.device.type != "cuda":
            raise SpecError(f"offload: {spec.offload!r} needs a CUDA device; the {spec.role} role is on {self.device}")
        # Pipelines and schedulers keep per-call state: shards in other threads take turns on one model.
        self.lock = threading.Lock()

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    def batches(self, n: int):
        """Index ranges of at most `batch_size` items covering `range(n)`."""
        for start in range(0, n, self.batch_size):
            yield range(start, min(start + self.batch_size, n))

    def _on_device(self):
        """Loads inside it see this role's GPU as the current one (libraries that say "cuda" mean it)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    def load_pretrained(self, model_class: Any, **kwargs: Any) -> torch.nn.Module:
        """A transformers model in eval mode, its weights loaded straight onto the role's device
        (`offload`: layers that do not fit spill to the CPU through accelerate's device_map)."""
        if self.random_weights:
            from music_model.zoo.arch import random_model

            kwargs.pop("trust_remote_code", None)
            return random_model(model_class, self.path, self.dtype, self.device, **kwargs).eval()
        if self.spec.offload != "none":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            kwargs |= {"device_map": "auto", "max_memory": {index: torch.cuda.mem_get_info(index)[0], "cpu": "1TiB"}}
        elif self.device.type != "cpu":
            kwargs["device_map"] = {"": self.device}
        with self._on_device():
            model = model_class.from_pretrained(self.path, dtype=self.dtype, revision=self.spec.revision, **kwargs)
        return model.eval()

    def load_pipeline(self) -> Any:
        """A diffusers pipeline with its weights loaded straight onto the role's device, or with
        diffusers' model / sequential CPU offload (`offload`) for GPUs it does not fit."""
        if self.random_weights:
            from music_model.zoo.arch import random_pipeline

            pipeline = random_pipeline(self.path, self.dtype, self.device)
        else:
            from diffusers import DiffusionPipeline

            from music_model.noise import quiet_progress_bars

            quiet_progress_bars()  # diffusers' "Loading pipeline components" bar
            # diffusers takes a device type here ("cuda"), which means the current device: _on_device sets it.
            direct = self.device.type == "cuda" and self.spec.offload == "none"
            with self._on_device():
                pipeline = DiffusionPipeline.from_pretrained(
                    self.path, dtype=self.dtype, trust_remote_code=self.spec.trust_remote_code, revision=self.spec.revision,
                    **({"device_map": "cuda"} if direct else {}))
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        if self.spec.offload == "model":
            pipeline.enable_model_cpu_offload(device=self.device)
        elif self.spec.offload == "sequential":
            pipeline.enable_sequential_cpu_offload(device=self.device)
        elif self.device.type == "cpu" or self.random_weights:
            pipeline.to(self.device)
        return pipeline

    def run_batched(self, count: int, run_batch: Callable[[range], list]) -> list:
        """`run_batch` over index ranges of at most `batch_size` covering `range(count)`, results
        concatenated. A batch that runs out of accelerator memory is halved and retried down to one
        item (counted in `thread_oom_retries`); at one item the error names the role and the memory."""
        results: list = []
        start, size = 0, self.batch_size
        while start < count:
            batch = range(start, min(start + size, count))
            try:
                results.extend(run_batch(batch))
            except torch.OutOfMemoryError as error:
                free_accelerator_memory()
                if len(batch) == 1:
                    raise OutOfMemory(
                        f"{self.spec.role} role ({self.spec.model}) ran out of memory on a batch of 1 "
                        f"(batch_size {self.batch_size}); {device_memory(self.device)}") from error
                size = max(1, len(batch) // 2)
                _thread.oom_retries = thread_oom_retries() + 1
                continue
            start = batch.stop
        return results

    def close(self) -> None:
        """Drop the models this role holds (the registry calls it when the role is released)."""
        for name, value in list(vars(self).items()):
            if name not in ("spec", "device", "dtype", "path", "lock"):
                delattr(self, name)
        self.released = True

    def __getattr__(self, name: str):
        if self.__dict__.get("released"):
            raise RuntimeError(f"the {self.spec.role} role ({self.spec.model}) was released; load it again with load_role")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
