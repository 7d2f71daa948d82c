"""The registry that owns every loaded model's lifetime.

`load_role(spec)` returns the loaded role for a `RoleSpec` on this thread's device (the device slot
it holds, see `slots.py`), loading it at most once per (spec, device) however many shards ask.
Residency is stage-scoped and decided here, never by a stage: the flow calls
`release_roles(keep=next stage's specs)` between stages, which frees every other model (its
modules dropped, the accelerator's cache emptied), so only the running stage's roles occupy the
device; a model that consecutive stages share stays. `model_loads()` counts loads, so a rerun that
loads nothing can be shown to load nothing.
"""
from __future__ import annotations

import importlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from data_specs.roles import BACKENDS, RoleSpec, parse_role_spec
from music_model.roles.base import Role, free_accelerator_memory, resolve_device

# (spec key, device) -> a loaded role, or another model object built from roles (`cached`).
_cache: dict[tuple[str, str], Any] = {}
_loads: Counter[str] = Counter()
_thread = threading.local()  # loads made by this thread, so concurrent shards count only their own
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def role_class(spec: RoleSpec) -> type[Role]:
    module_name, class_name = BACKENDS[(spec.role, spec.backend)].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def cached(key: str, device: str, factory: Callable[[], Any]) -> Any:
    """The object cached under (key, device), made by `factory` once however many threads ask."""
    slot = (key, device)
    if slot in _cache:
        return _cache[slot]
    with _locks_guard:
        lock = _locks.setdefault(slot, threading.Lock())
    with lock:  # two threads asking for the same model load it once
        if slot not in _cache:
            started = time.perf_counter()
            _cache[slot] = factory()
            _loads[key] += 1
            _thread.loads = getattr(_thread, "loads", 0) + 1
            _thread.load_seconds = thread_load_seconds() + time.perf_counter() - started
    return _cache[slot]


def load_role(spec: RoleSpec | dict[str, Any]) -> Role:
    """The loaded role for `spec` on this thread's device, from the cache when it is there."""
    if not isinstance(spec, RoleSpec):
        spec = parse_role_spec(spec)
    return cached(spec.cache_key(), str(resolve_device(spec.device)), lambda: role_class(spec)(spec))


def release_roles(keep: Iterable[RoleSpec] = ()) -> list[str]:
    """Free every cached model whose spec is not in `keep`; returns the released keys. Call it
    between stages, when no shard is using a model (the flow waits for a stage's shards)."""
    kept = {spec.cache_key() for spec in keep}
    released = [slot for slot in list(_cache) if slot[0] not in kept]
    for slot in released:
        close = getattr(_cache.pop(slot), "close", None)
        if close:
            close()
    if released:
        free_accelerator_memory()
    return [key for key, _ in released]


def resident_roles() -> list[tuple[str, str, str]]:
    """(role, model, device) of every model the registry holds now ("-" role: a `cached` object)."""
    rows = []
    for (key, device), held in _cache.items():
        rows.append((held.spec.role, held.spec.model, device) if isinstance(held, Role) else ("-", key, device))
    return sorted(rows)


def model_loads() -> dict[str, int]:
    """Loads per role-spec key since the process started (or since `clear_cache`)."""
    return dict(_loads)


def total_model_loads() -> int:
    return sum(_loads.values())


def thread_model_loads() -> int:
    """Loads made by the calling thread since the process started."""
    return getattr(_thread, "loads", 0)


def thread_load_seconds() -> float:
    """Seconds the calling thread spent loading models since the process started."""
    return getattr(_thread, "load_seconds", 0.0)


def clear_cache() -> None:
    """Release every model and forget the load counts."""
    release_roles()
    _loads.clear()
