"""Which of xgrammar's kernels masks a grammar's tokens, and whether this machine can build the default one.

On CUDA logits xgrammar's `apply_token_bitmask_inplace` launches a Triton kernel
(`xgrammar/matcher.py`, backend "triton"). Triton compiles a small C launcher on first use with a C
compiler (`$CC`, else gcc, else clang: `triton/runtime/build.py`) against the interpreter's
`Python.h`; slim CUDA images have neither, and the first grammar step of a build would fail there.
Where either is missing the mask uses xgrammar's torch-native kernel (backend "torch_native": the
same mask from plain torch operations; its speed beside Triton's is not measured here), and says
so once.

Triton launches on the calling thread's current CUDA device and stream, not the tensor's: the
device slots make the slot's device current (`slots.device_current`) and the decoder masks inside
its logits' device as well.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sysconfig
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)


def _python_include_dir() -> Path:
    # Triton's choice (triton/runtime/build.py): Debian's 'posix_local' scheme reads as 'posix_prefix'.
    scheme = sysconfig.get_default_scheme()
    return Path(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"])


def triton_toolchain_problem() -> str | None:
    """Why Triton cannot build its launcher on this machine (one line naming the missing piece and
    what to install), or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    compiler = os.environ.get("CC")
    if compiler is not None:
        if shutil.which(compiler.split()[0]) is None:
            return f"$CC is {compiler!r}, which is not an executable on PATH"
    elif shutil.which("gcc") is None and shutil.which("clang") is None:
        return "no C compiler (install gcc or clang, or set $CC)"
    header = _python_include_dir() / "Python.h"
    if not header.is_file():
        return f"no {header} (install the Python development headers, e.g. python3-dev)"
    return None


@lru_cache(maxsize=1)
def _toolchain_problem_once() -> str | None:
    problem = triton_toolchain_problem()
    if problem:
        logger.warning("xgrammar's Triton bitmask kernel cannot be built here: %s; grammar masks use xgrammar's "
                       "torch-native kernel", problem)
    return problem


def bitmask_backend(device_type: str) -> str:
    """xgrammar's `apply_token_bitmask_inplace` backend for logits on `device_type`: its own choice
    ("auto"), except on CUDA without Triton's toolchain, where it is "torch_native"."""
    if device_type == "cuda" and _toolchain_problem_once():
        return "torch_native"
    return "auto"
