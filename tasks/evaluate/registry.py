"""Every benchmark: the one list the flows, the pipeline and the `music` CLI read.

Adding a benchmark is a module holding a `BENCHMARK` (a `tasks.evaluate.benchmark.Benchmark`) and
one line below. Modules are imported on first use, so importing this module loads no model code.
"""
from __future__ import annotations

import importlib

from tasks.evaluate.benchmark import Benchmark

# One line per benchmark, in the order the pipeline generates on and reports them.
MODULES = [
    "tasks.evaluate.cases",
    "tasks.evaluate.dreambench",
]


def benchmarks() -> dict[str, Benchmark]:
    """Name -> benchmark, in `MODULES` order."""
    found = {}
    for module in MODULES:
        bench = importlib.import_module(module).BENCHMARK
        if bench.name in found:
            raise ValueError(f"{module}: benchmark name {bench.name!r} is taken")
        found[bench.name] = bench
    return found


def benchmark(name: str) -> Benchmark:
    known = benchmarks()
    if name not in known:
        raise ValueError(f"benchmark must be one of {', '.join(known)}, got {name!r}")
    return known[name]
