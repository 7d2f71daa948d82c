"""Device slots: one per accelerator of this machine (or `cpu_slots` on a machine without one).

A shard that runs models takes a slot for as long as it runs, and its roles load on that slot's
device: N GPUs run N shards at once, each on its own GPU, whatever number of flows, workers or
threads share the machine.

A slot is an exclusive `flock` on a file under the slot folder (`$MUSIC_SLOT_DIR`, default
`<tmp>/music-slots`, one folder a machine). The kernel drops the lock the instant its holder dies
(kill -9, OOM killer, a lost server): nothing is held by the dead and no server is involved, so a
Prefect server restart cannot orphan a slot. Taking a free slot costs microseconds (a Prefect
global concurrency limit costs ~1 s an acquire, and its leases live in the server's memory).
A holder writes who it is (flow run, host, pid, since) beside its lock, so a shard that waits
longer than `report_every` seconds says once a minute who holds the slots.

The thread that holds a GPU slot runs with that GPU as its current CUDA device (`device_current`):
a kernel launched without naming a device (Triton's, xgrammar's grammar mask among them) goes to
the current device and its current stream, and every new thread starts on device 0, so without it
a shard on `cuda:1` would launch such kernels on GPU 0 against GPU 1's memory.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from safe_files import write_text
from music_model import settings

POLL_SECONDS = 0.05
REPORT_EVERY_SECONDS = 60.0

_current = threading.local()


def slot_dir() -> Path:
    return Path(settings.SLOT_DIR.get() or Path(tempfile.gettempdir()) / "music-slots")


@dataclass(frozen=True)
class Slot:
    name: str  # the lock file's stem: one physical device
    device: str  # the torch device this process reaches it by


def machine_slots(cpu_slots: int) -> list[Slot]:
    """This process's view of the machine's devices: every visible GPU, named by its UUID so two
    processes with different CUDA_VISIBLE_DEVICES still agree which physical GPU a slot is; without
    a GPU, `cpu_slots` slots on the CPU (the local pool's bound)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count():
        slots = []
        for index in range(torch.cuda.device_count()):
            uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or f"index-{index}")
            slots.append(Slot(f"gpu-{uuid}", f"cuda:{index}"))
        return slots
    return [Slot(f"cpu-{index}", "cpu") for index in range(cpu_slots)]


@contextmanager
def device_current(device) -> Iterator[None]:
    """`device` (a torch device or its name) as this thread's current CUDA device while the block
    runs, and with it that device's current stream (the previous device is current again after);
    nothing for a CPU device or a bare "cuda", which means the current one."""
    import torch

    target = torch.device(device)
    if target.type != "cuda" or target.index is None:
        yield
        return
    with torch.cuda.device(target.index):
        yield


def current_device() -> str | None:
    """The device of the slot this thread holds, or None outside a slot."""
    return getattr(_current, "device", None)


def _holder_file(lock_path: Path) -> Path:
    return lock_path.with_suffix(".holder.json")


def read_holder(lock_path: Path) -> dict:
    try:
        return json.loads(_holder_file(lock_path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_holder(lock_path: Path, record: dict) -> None:
    """Say who holds `lock_path` (atomically: a reader never sees half a record)."""
    write_text(_holder_file(lock_path), json.dumps(record))


def describe_holders(locks: list[Path], now: float) -> str:
    parts = []
    for path in locks:
        holder = read_holder(path)
        since = holder.get("since")
        held = f" for {now - since:.0f} s" if since else ""
        who = ", ".join(f"{k} {holder[k]}" for k in ("what", "flow_run", "host", "pid") if holder.get(k)) or "an unknown holder"
        parts.append(f"{path.stem} held by {who}{held}")
    return "; ".join(parts)


def _lock(folder: Path, slot: Slot) -> FileLock:
    # Not thread-local: the holder releases what it took; the file stays, so waiters never lock a deleted inode.
    return FileLock(folder / f"{slot.name}.lock", thread_local=False, preserve_lock_file=True)


def _take_free(locks: list[tuple[Slot, FileLock]]) -> tuple[Slot, FileLock] | None:
    for slot, lock in locks:
        try:
            lock.acquire(blocking=False)
        except Timeout:
            continue
        return slot, lock
    return None


@contextmanager
def device_slot(slots: list[Slot], holder: dict | None = None, log: Callable[[str], None] | None = None,
                report_every: float = REPORT_EVERY_SECONDS) -> Iterator[Slot]:
    """Hold one free slot of `slots` (waiting for one), with its device as this thread's device for
    the roles (`current_device`) and its current CUDA device (`device_current`); `holder` (what,
    flow_run, ...) is written beside the lock for whoever waits."""
    folder = slot_dir()
    folder.mkdir(parents=True, exist_ok=True)
    locks = [(slot, _lock(folder, slot)) for slot in slots]
    started = last_report = time.monotonic()
    while (taken := _take_free(locks)) is None:
        now = time.monotonic()
        if log and now - last_report >= report_every:
            last_report = now
            log(f"waiting {now - started:.0f} s for a device slot in {folder} ({len(slots)} slots): "
                + describe_holders([Path(lock.lock_file) for _, lock in locks], time.time()))
        time.sleep(POLL_SECONDS)
    slot, lock = taken
    record = {**(holder or {}), "host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "device": slot.device}
    write_holder(Path(lock.lock_file), record)
    previous = current_device()
    _current.device = slot.device
    try:
        with device_current(slot.device):
            yield slot
    finally:
        _current.device = previous
        lock.release()


def free_slots(slots: list[Slot]) -> int:
    """How many of `slots` no process holds now (each is tried and given straight back)."""
    folder = slot_dir()
    folder.mkdir(parents=True, exist_ok=True)
    free = 0
    for slot in slots:
        if (taken := _take_free([(slot, _lock(folder, slot))])) is not None:
            taken[1].release()
            free += 1
    return free
