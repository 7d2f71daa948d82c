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
from tasks.engine.build_paths import stage_dir
from tasks.engine.contract import fingerprint, read_rows, run_shard
from tasks.stages import filter as filter_stage

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


class RecordedCudaDevice:
    """Stands in for `torch.cuda.device` on this CUDA-less machine and records, per thread, the
    device each `with` makes current; the slot code calls it exactly as it calls torch's."""
    calls: list[tuple[str, int, int]] = []

    def __init__(self, index: int):
        self.index = index

    def __enter__(self):
        self.calls.append(("enter", threading.get_ident(), self.index))

    def __exit__(self, *exc):
        self.calls.append(("exit", threading.get_ident(), self.index))


def test_a_shard_in_a_slot_for_cuda_1_runs_with_that_device_current(tmp_path, monkeypatch):
    """Triton (xgrammar's mask kernel) launches on the thread's current device: a pool thread
    starts on device 0, so the slot makes its GPU current for as long as the shard holds it."""
    from concurrent.futures import ThreadPoolExecutor

    from music_model.roles.base import resolve_device

    monkeypatch.setenv("MUSIC_SLOT_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "device", RecordedCudaDevice)
    RecordedCudaDevice.calls = []

    def shard() -> tuple[int, str | None, torch.device, list]:
        with device_slot([Slot("gpu-test-uuid", "cuda:1")], {"what": "layout-shard-00001"}):
            return threading.get_ident(), current_device(), resolve_device("auto"), list(RecordedCudaDevice.calls)

    with ThreadPoolExecutor(2) as pool:  # the local runner's shard threads
        thread, device, roles_device, during = pool.submit(shard).result()
    assert thread != threading.get_ident()
    assert (device, roles_device) == ("cuda:1", torch.device("cuda:1"))
    assert during == [("enter", thread, 1)]  # current while the shard runs, in the shard's own thread
    assert RecordedCudaDevice.calls == [("enter", thread, 1), ("exit", thread, 1)]
    with device_slot([Slot("cpu-a", "cpu")], {"what": "cpu-shard"}):
        pass
    assert len(RecordedCudaDevice.calls) == 2  # a CPU slot sets no CUDA device


def test_without_a_c_compiler_or_python_h_the_mask_uses_xgrammars_torch_kernel(monkeypatch, tmp_path):
    import sysconfig

    import xgrammar as xgr

    from music_model.roles import kernels
    from tasks.checks.preflight import kernel_notes
    from tasks.stages import load_build_spec

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert "$CC is" in kernels.triton_toolchain_problem()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, no clang
    assert kernels.triton_toolchain_problem() == "no C compiler (install gcc or clang, or set $CC)"
    monkeypatch.undo()
    monkeypatch.setenv("CC", sys.executable)  # an executable: the header is what is missing
    real_paths = sysconfig.get_paths
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {**real_paths(*a, **k), "include": str(tmp_path)})
    assert kernels.triton_toolchain_problem() == f"no {tmp_path / 'Python.h'} (install the Python development headers, e.g. python3-dev)"
    spec = load_build_spec("tiny.yaml")
    notes = kernel_notes(spec, cuda=True)
    assert len(notes) == 1 and notes[0].startswith("roles.llm, roles.vlm: xgrammar's Triton bitmask kernel cannot be built")
    assert kernel_notes(spec, cuda=False) == []
    kernels._toolchain_problem_once.cache_clear()
    try:
        assert (kernels.bitmask_backend("cuda"), kernels.bitmask_backend("cpu")) == ("torch_native", "auto")
    finally:
        kernels._toolchain_problem_once.cache_clear()
    # The fallback masks exactly as the default kernel does.
    logits = torch.randn(3, 100)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32)
    native, default = logits.clone(), logits.clone()
    xgr.apply_token_bitmask_inplace(native, bitmask, backend="torch_native")
    xgr.apply_token_bitmask_inplace(default, bitmask)
    assert torch.equal(native, default) and native.isinf().any()


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
