"""Model roles: every model the pipeline runs, behind one interface per role and one registry.

`registry.py` loads a role once per (spec, device) and frees what the next stage does not need;
`base.py` holds what every role shares (device and dtype, loading straight onto the device, batches
that halve on out-of-memory); `slots.py` the device slots a shard holds while its models run; one
module per role (`llm`, `vlm`, `t2i`, `editor`, `detector`, `segmenter`, `clip`, `dino`) with its
backends; `structured.py` the schema-constrained decoding of the text roles; `smoke.py` the
one-batch check of every role x backend (`music roles check`).

May import `media`, `zoo` and the top-level `paths` and `noise`; never `subjects`, `scoring` or
`music`, which use it.
"""
from music_model.roles.base import free_accelerator_memory, peak_memory_bytes, reset_peak_memory, thread_oom_retries
from music_model.roles.registry import (BACKENDS, cached, clear_cache, load_role, model_loads, release_roles, resident_roles,
                                        role_class, thread_load_seconds, thread_model_loads, total_model_loads)

__all__ = ["BACKENDS", "cached", "clear_cache", "free_accelerator_memory", "load_role", "model_loads", "peak_memory_bytes",
           "release_roles", "reset_peak_memory", "resident_roles", "role_class", "thread_load_seconds", "thread_model_loads",
           "thread_oom_retries", "total_model_loads"]
