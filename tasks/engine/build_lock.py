"""One build per output folder: a lock file beside the build, held for the whole run, its holder
written beside it so a second run names who has the folder."""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from data_specs.build import BuildSpec
from music_model.roles.slots import describe_holders, write_holder
from tasks.engine.build_paths import build_dir

LOCK_GRACE_SECONDS = 1.0


class BuildLocked(RuntimeError):
    """Another process is building into this output folder; the message names it."""


def lock_path(spec: BuildSpec) -> Path:
    return build_dir(spec) / ".build.lock"


def _build_lock(spec: BuildSpec) -> FileLock:
    path = lock_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The file stays, so a waiter never locks a deleted inode; the kernel frees the lock when its holder dies.
    return FileLock(path, thread_local=False, preserve_lock_file=True)


def lock_holder(spec: BuildSpec) -> str | None:
    """Who holds this build's lock now (None: nobody); the lock is tried and given straight back."""
    lock = _build_lock(spec)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return describe_holders([lock_path(spec)], time.time())
    lock.release()
    return None


def busy_message(spec: BuildSpec, holder: str) -> str:
    return f"{build_dir(spec)} is being built by another run ({holder}): wait for it, or pass --wait"


@contextmanager
def build_lock(spec: BuildSpec, holder: dict, wait: bool = False, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the build folder's lock for the body: with `wait`, wait for it; else raise `BuildLocked`
    naming the holder at once. `holder` (what, flow_run) is written beside the lock for the others."""
    lock = _build_lock(spec)
    try:
        # A second's grace: `lock_holder` (a `music build` checking first) holds it for microseconds.
        lock.acquire(timeout=LOCK_GRACE_SECONDS, poll_interval=0.05)
    except Timeout:
        who = describe_holders([lock_path(spec)], time.time())
        if not wait:
            raise BuildLocked(busy_message(spec, who)) from None
        if log:
            log(f"waiting for {build_dir(spec)}: {who}")
        lock.acquire()
    write_holder(lock_path(spec), {**holder, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    try:
        yield
    finally:
        lock.release()
