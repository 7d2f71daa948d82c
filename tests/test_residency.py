"""Model residency, device slots and out-of-memory halving, on real tiny models (no Prefect)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from music_model.roles import load_role, release_roles, resident_roles, thread_oom_retries
from music_model.roles.base import OutOfMemory
from music_model.roles.slots import Slot, current_device, device_slot, free_slots, slot_dir
from tasks import filter as filter_stage
from tasks.engine import fingerprint, read_rows, run_shard, stage_dir

CLIP = {"role": "clip", "backend": "transformers", "model": "zoo:clip_b32", "batch_size": 8}
DINO = {"role": "dino", "backend": "transformers", "model": "zoo:dino_vits16", "batch_size": 8}


def fail_batches_over(module: torch.nn.Module, largest: int):
    """A forward pre-hook that raises CUDA's out-of-memory error for batches over `largest` (as a
    real GPU does for a batch that does not fit); returns its handle."""
    def hook(_, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        if pixels.shape[0] > largest:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected for a batch of {pixels.shape[0]})")
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_an_out_of_memory_batch_is_halved_and_the_shard_completes(chain, tmp_path):
    spec, out = chain
    again = spec.model_copy(update={"output_root": str(tmp_path)})
    clip = load_role(again.roles["clip"])
    decimated = out["decimate"][3]
    upstream_fp = decimated.name
    fp = fingerprint(filter_stage.STAGE, again, upstream_fp)
    assert len(out["decimate"][1]) > 2 and clip.batch_size >= 8
    handle = fail_batches_over(clip.model.vision_model, 1)
    try:
        summary = run_shard(filter_stage.STAGE, again, 0, fp, decimated)
    finally:
        handle.remove()
    assert summary["oom_retries"] >= 2  # e.g. 4 -> 2 -> 1 image a batch
    kept = read_rows(stage_dir(again, "filter", fp) / "part-00000.parquet")
    assert [r["id"] for r in kept] == [r["id"] for r in out["filter"][1]]


def test_out_of_memory_at_one_item_names_the_role_and_the_batch_size():
    from PIL import Image

    clip = load_role(CLIP)
    before = thread_oom_retries()
    handle = fail_batches_over(clip.model.vision_model, 0)
    try:
        with pytest.raises(OutOfMemory, match=r"clip role \(zoo:clip_b32\) ran out of memory on a batch of 1 \(batch_size 8\); cpu"):
            clip.embed_images([Image.new("RGB", (64, 64))] * 5)
    finally:
        handle.remove()
    assert thread_oom_retries() - before == 2  # 5 -> 2 -> 1, then the error


def test_release_keeps_only_the_named_models_and_a_released_role_says_so():
    clip, dino = load_role(CLIP), load_role(DINO)
    assert {("clip", "zoo:clip_b32", "cpu"), ("dino", "zoo:dino_vits16", "cpu")} <= set(resident_roles())
    released = release_roles(keep=[clip.spec])
    assert dino.spec.cache_key() in released and clip.spec.cache_key() not in released
    assert [r for r in resident_roles() if r[0] == "dino"] == []
    assert load_role(CLIP) is clip  # kept: not reloaded
    with pytest.raises(RuntimeError, match="dino role .* was released"):
        dino.embed_images([])
    assert load_role(DINO) is not dino  # a released role loads afresh


def test_a_thread_in_a_slot_loads_its_roles_on_the_slot_device(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSIC_SLOT_DIR", str(tmp_path))
    with device_slot([Slot("cpu-a", "cpu")], {"what": "test"}):
        assert current_device() == "cpu"
        assert load_role(CLIP).device == torch.device("cpu")
    assert current_device() is None


def test_slots_bound_concurrent_shards_and_waiters_name_the_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSIC_SLOT_DIR", str(tmp_path))
    slots = [Slot("cpu-a", "cpu")]
    inside, logs, order = threading.Event(), [], []

    def holder():
        with device_slot(slots, {"what": "first-shard", "flow_run": "run-1"}):
            inside.set()
            time.sleep(0.6)
            order.append("first done")

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(5)
    with device_slot(slots, {"what": "second"}, log=logs.append, report_every=0.2):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]
    assert logs and "cpu-a held by what first-shard, flow_run run-1, host" in logs[0] and f"pid {os.getpid()}" in logs[0]
    assert free_slots(slots) == 1


def test_a_slot_held_by_a_killed_process_comes_back(tmp_path):
    """kill -9 of a shard's process (or of the server: slots never involve it) frees its slot."""
    env = {**os.environ, "MUSIC_SLOT_DIR": str(tmp_path)}
    code = ("import time\nfrom music_model.roles.slots import Slot, device_slot\n"
            "with device_slot([Slot('cpu-a', 'cpu')], {'what': 'doomed-shard'}):\n    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.environ["MUSIC_SLOT_DIR"] = str(tmp_path)
        slots = [Slot("cpu-a", "cpu")]
        assert free_slots(slots) == 0
        logs: list[str] = []
        waiter = threading.Thread(target=lambda: device_slot(slots, log=logs.append, report_every=0.1).__enter__())
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and "doomed-shard, host" in logs[0] and f"pid {holder.pid}" in logs[0]
        holder.send_signal(signal.SIGKILL)
        waiter.join(10)
        assert not waiter.is_alive(), "the dead holder's slot did not come back"
    finally:
        holder.kill()
        os.environ.pop("MUSIC_SLOT_DIR", None)
    assert slot_dir() != tmp_path
