"""Model roles behind one loader with a process-level cache.

`load_role(spec)` returns the loaded role for a `RoleSpec`, loading it at most once per process
however many shards ask for it; `model_loads()` counts the loads, so a rerun that loads nothing
can be shown to load nothing.
"""
from __future__ import annotations

import importlib
import threading
from collections import Counter
from typing import Any

from data_specs.roles import RoleSpec, parse_role_spec
from music_model.roles.base import Role

# (role, backend) -> "module:Class"; imported lazily so a CPU-only stage never imports diffusers.
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

_cache: dict[str, Role] = {}
_loads: Counter[str] = Counter()
_thread = threading.local()  # loads made by this thread, so concurrent shards count only their own
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def role_class(spec: RoleSpec) -> type[Role]:
    module_name, class_name = BACKENDS[(spec.role, spec.backend)].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_role(spec: RoleSpec | dict[str, Any]) -> Role:
    """The loaded role for `spec`, from the process cache when it is there."""
    if not isinstance(spec, RoleSpec):
        spec = parse_role_spec(spec)
    key = spec.cache_key()
    if key in _cache:
        return _cache[key]
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:  # two threads asking for the same model load it once
        if key not in _cache:
            _cache[key] = role_class(spec)(spec)
            _loads[key] += 1
            _thread.loads = getattr(_thread, "loads", 0) + 1
    return _cache[key]


def model_loads() -> dict[str, int]:
    """Loads per role-spec key since the process started (or since `clear_cache`)."""
    return dict(_loads)


def total_model_loads() -> int:
    return sum(_loads.values())


def thread_model_loads() -> int:
    """Loads made by the calling thread since the process started."""
    return getattr(_thread, "loads", 0)


def clear_cache() -> None:
    """Forget loaded models and load counts (frees memory between unrelated jobs)."""
    _cache.clear()
    _loads.clear()
