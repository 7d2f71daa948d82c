"""Operational failures: a condition of the machine, not a bug of ours, ends a run in one line.

A full disk, a read-only or permission-denied folder, a file another process holds, host memory
exhausted or a GPU that dropped off the bus stops a build, an MSIC build, a training or an
evaluation with exit status 2 and one line on stderr naming the condition, the path or device,
what the machine has (free bytes, owner and mode) and what to do; the full traceback goes to a log
file (under the run's folder, or the state folder when that one cannot be written), named in the
line. The first shard to hit the condition ends the process, so no new shard is scheduled and the
shards in flight do not each report it: their outputs are written atomically and marked last, so a
rerun resumes. Anything `describe` does not recognise is raised as before, with its traceback.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from music_model.paths import state_dir

EXIT_OPERATIONAL = 2
# Called with the line before the process exits: the flows register ending their Prefect runs.
before_exit: list[Callable[[str], None]] = []

RESUME = "then rerun the same command: finished work is kept and the run resumes"
IN_USE = {errno.EBUSY, errno.ETXTBSY, errno.EAGAIN}
# What torch says when the GPU itself failed (lost from the bus, reset, driver gone), not our kernels' input.
DEVICE_LOST = ("fallen off the bus", "unspecified launch failure", "device-side assert", "busy or unavailable",
               "no CUDA-capable device", "CUDA driver", "unknown error", "ECC error", "NVML")


def _size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor (what a stat or a free-space query can ask about)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _owner(path: Path) -> str:
    stat = path.stat()
    return (f"owned by uid {stat.st_uid} with mode {stat.st_mode & 0o7777:o}, this process runs as uid "
            f"{os.geteuid()}")


def _cause(error: BaseException) -> BaseException:
    """The error a Ray task error wraps, else `error`."""
    return getattr(error, "cause", None) or error


def describe(error: BaseException, where: Path) -> str | None:
    """The one line for an operating-system or device condition, or None (a bug of ours, or not ours
    to judge). `where`: the run's folder, asked about when the error names no file."""
    error = _cause(error)
    # A file that does not exist (yet): a temporary one being written; its folder says more.
    path = _existing(Path(getattr(error, "filename", None) or where))
    if isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno == errno.ENOMEM):
        import psutil

        memory = psutil.virtual_memory()
        return (f"host memory exhausted ({_size(memory.available)} available of {_size(memory.total)}): stop other jobs "
                f"on this machine or lower the roles' batch_size or shard_size, {RESUME}")
    if type(error).__name__ == "OutOfMemoryError":  # torch's, after the roles' batch halving gave up
        return (f"accelerator memory exhausted ({str(error).splitlines()[0][:200]}): free the GPU, use a smaller dtype or "
                f"offload, {RESUME}")
    if type(error).__name__ == "AcceleratorError" or (isinstance(error, RuntimeError) and "CUDA" in str(error)
                                                      and any(s in str(error) for s in DEVICE_LOST)):
        device = os.environ.get("CUDA_VISIBLE_DEVICES", "all visible")
        return (f"the GPU failed or dropped off the bus ({str(error).splitlines()[0][:200]}; CUDA_VISIBLE_DEVICES "
                f"{device}): check it with nvidia-smi, reset it or leave it out, {RESUME}")
    if not isinstance(error, OSError) or error.errno is None:
        return None
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        usage = shutil.disk_usage(path)
        kind = "quota" if error.errno == errno.EDQUOT else "disk"
        return (f"the {kind} under {path} is full ({_size(usage.free)} free of {_size(usage.total)}): free space "
                f"(`music clean --yes` removes what the spec no longer uses), {RESUME}")
    if error.errno == errno.EROFS:
        return (f"{path} is on a read-only file system: remount it read-write or set output_root to a writable folder, "
                f"{RESUME}")
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on {path} ({_owner(path)}): give this user write access or set output_root, {RESUME}"
    if error.errno in IN_USE:
        return f"{path} is in use or locked by another process ({os.strerror(error.errno)}): stop it, {RESUME}"
    if error.errno in (errno.EMFILE, errno.ENFILE):
        return f"too many open files ({os.strerror(error.errno)}): raise the limit (ulimit -n), {RESUME}"
    if error.errno in (errno.EIO, errno.ESTALE):
        return (f"input/output error on {path} ({os.strerror(error.errno)}): the disk or network file system failed; "
                f"check it (dmesg), {RESUME}")
    return None


def write_log(error: BaseException, where: Path) -> Path | None:
    """The traceback in `<where>/logs/error-<UTC time>-<pid>.log`, or under the state folder when
    `where` cannot be written (a full, read-only or denied folder), or the temporary folder; None
    when none can."""
    name = f"error-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
    text = "".join(traceback.format_exception(error))
    for folder in (Path(where) / "logs", state_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return None


def stop(error: BaseException, line: str, where: Path) -> NoReturn:
    """Log the traceback, print the line, end this process's runs, exit `EXIT_OPERATIONAL` at once
    (from a shard's thread too: the pool schedules nothing more)."""
    log = write_log(error, where)
    line = f"{line} (traceback in {log})" if log else line
    for hook in before_exit:
        try:
            hook(line)
        except Exception:  # the server may be unreachable too; the next run crashes what is left RUNNING
            pass
    os.write(sys.stderr.fileno(), f"error: {line}\n".encode())  # not print: a flow with log_prints makes it a log record
    os._exit(EXIT_OPERATIONAL)


@contextmanager
def operational_exit(where: Path) -> Iterator[None]:
    """Around a run's work (a shard, a publish, a flow body, a CLI command): an operational condition
    ends the process in one line (`stop`); any other error propagates unchanged."""
    try:
        yield
    except BaseException as error:
        line = describe(error, where)
        if line is None or _in_ray_worker():  # a Ray worker's error reaches the flow's process, which stops
            raise
        stop(error, line, where)


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def run_folder(spec_json: str) -> Path:
    """The folder a spec's run writes (`<output_root>/<name>`, for build, train and eval specs alike)."""
    spec = json.loads(spec_json)
    return Path(spec["output_root"]).expanduser() / spec["name"]


def stops_on_fault(function: Callable) -> Callable:
    """A task whose first argument is its spec's JSON: an operational failure in it ends the process
    in one line (`operational_exit` in the spec's run folder) instead of failing the task run."""
    @functools.wraps(function)
    def wrapper(spec_json: str, *args, **kwargs):
        with operational_exit(run_folder(spec_json)):
            return function(spec_json, *args, **kwargs)
    return wrapper
