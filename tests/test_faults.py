"""Faults of the things a build depends on: the Prefect server killed mid-build (and restarted),
and the build itself stopped with SIGTERM. What is finished stays finished, nothing waits for a
slot held by the dead, and the process says what happened in one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_build import data_bytes, tiny_spec
from test_ops import api_post, flow_run

from music_model.roles.slots import Slot, free_slots

pytestmark = pytest.mark.prefect
CPU_SLOTS = [Slot("cpu-0", "cpu"), Slot("cpu-1", "cpu")]  # what the local runner's 2 workers share


def start_build(spec: Path, env: dict, json_out: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "flows.cli", "build", str(spec)] + (["--json", str(json_out)] if json_out else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(path_glob: Path, pattern: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not list(path_glob.glob(pattern)):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {pattern} after {timeout} s"
        time.sleep(0.2)


def resume_to_the_session_build(spec: Path, env: dict, tmp_path: Path, tiny_build: dict) -> dict:
    """`music build` again after the server died mid-build: it resumes from the finished shards and
    publishes the session's bytes; its --json result."""
    resumed_out = tmp_path / "resumed.json"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(spec), "--json", str(resumed_out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads(resumed_out.read_text())
    assert resumed["stages"][0]["shards_skipped"] == 2  # compose was finished before the server died
    assert data_bytes(Path(resumed["dataset"])) == tiny_build["bytes"]
    return resumed


def test_server_killed_mid_build_fails_fast_then_a_rerun_resumes_byte_identical(tmp_path, zoo_root, tiny_build):
    """A build on its own server (its own MUSIC_HOME): SIGKILL the server during the build. The
    build exits with code 2 within seconds, one line naming the API and what to do; the next
    `music build` starts a new server on the same database and completes the same bytes as an
    undisturbed build (the session's); no slot stays held."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"MUSIC_HOME": str(home), "MUSIC_ZOO_DIR": str(zoo_root), "MUSIC_SLOT_DIR": str(tmp_path / "slots")}
    spec = tiny_spec(tmp_path, "tiny")
    build = start_build(spec, env)
    wait_for(tmp_path / "out" / "tiny" / "stages", "verify/*/*.done.json", build)
    server = json.loads((home / "prefect" / "server.json").read_text())
    os.killpg(server["pid"], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = build.communicate(timeout=120)
    seconds = time.monotonic() - killed
    assert build.returncode == 2, stderr[-3000:]
    assert f"the Prefect server at {server['api_url']} stopped answering" in stderr and "music server" in stderr
    assert seconds < 30, seconds
    print(f"server killed -> build exited in {seconds:.1f} s with {len(stderr.splitlines())} stderr lines")

    resume_to_the_session_build(spec, env, tmp_path, tiny_build)
    os.environ["MUSIC_SLOT_DIR"] = env["MUSIC_SLOT_DIR"]
    try:
        assert free_slots(CPU_SLOTS) == 2
    finally:
        os.environ.pop("MUSIC_SLOT_DIR")
    subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop"], env=env, capture_output=True, timeout=60)


def test_sigterm_ends_a_build_within_seconds_with_its_run_crashed_and_slots_free(tmp_path, prefect_api):
    env = {**os.environ, "MUSIC_SLOT_DIR": str(tmp_path / "slots")}
    spec = tiny_spec(tmp_path, "tiny-sigterm")
    build = start_build(spec, env)
    wait_for(tmp_path / "out" / "tiny-sigterm" / "stages", "synthesize/*/*.done.json", build)
    build.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = build.communicate(timeout=120)
    seconds = time.monotonic() - sent
    assert build.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM: flow runs ended: build-tiny-sigterm" in stderr
    assert seconds < 20, seconds
    print(f"SIGTERM -> build exited in {seconds:.1f} s")
    run = api_post(prefect_api, "/flow_runs/filter", {"flow_runs": {"name": {"any_": ["build-tiny-sigterm"]}}})[0]
    assert flow_run(prefect_api, run["id"])["state_type"] == "CRASHED"
    tasks = api_post(prefect_api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert not [t for t in tasks if t["state_type"] == "RUNNING"]
    os.environ["MUSIC_SLOT_DIR"] = env["MUSIC_SLOT_DIR"]
    try:
        assert free_slots(CPU_SLOTS) == 2
    finally:
        os.environ.pop("MUSIC_SLOT_DIR")
    # No shard is half-written: each part is whole (written to a temporary file, then renamed), and
    # a shard the signal stopped between its parts and its marker (written last) is not done: the
    # rerun redoes it, as for a kill.
    import pyarrow.parquet as pq

    parts = list((tmp_path / "out" / "tiny-sigterm" / "stages").glob("*/*/part-*[0-9].parquet"))
    assert parts
    for part in parts:
        pq.read_metadata(part)  # a torn file has no footer


# --- damaged images: never trusted again ------------------------------------------------------------


def damage_a_published_target(build_folder: Path) -> str:
    """Flip one byte in the middle of a stored target image that is published (same size: only its
    sha256 shows it, as after a bad copy or bit rot) and remove the publication (the dataset and its
    releases, so the build must publish again); the image's path."""
    import shutil

    import pyarrow.parquet as pq

    part = next(build_folder.glob("stages/filter/*/part-00001.parquet"))
    relative = pq.read_table(part, columns=["image"]).column("image")[0].as_py()["path"]
    image = build_folder / relative
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    shutil.rmtree(build_folder / "dataset")
    shutil.rmtree(build_folder / "releases")
    return relative


def test_an_image_damaged_at_equal_size_is_removed_by_verify_and_its_shard_redone(tiny_build, tmp_path, prefect_api):
    """`music build --verify` finds the image, removes it (the store keeps a name it holds) and redoes
    the synthesize shard that made it, which writes it anew: the same bytes as an undisturbed build."""
    from collections import Counter

    from test_build import copy_build, music, task_runs_by_stage

    spec = copy_build(tiny_build, tmp_path)
    build_folder = tmp_path / "out" / "tiny"
    relative = damage_a_published_target(build_folder)
    done = music("build", str(spec), "--verify")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logged = [line for line in (done.stdout + done.stderr).splitlines() if "has another sha256 than its name" in line]
    assert len(logged) == 1 and "redoing synthesize shard" in logged[0] and relative in logged[0], logged
    assert "Traceback" not in done.stdout + done.stderr
    assert task_runs_by_stage(prefect_api) == Counter({"synthesize": 1, "publish": 1})
    assert data_bytes(build_folder / "dataset") == tiny_build["bytes"]


def test_a_damaged_image_only_publish_reads_redoes_its_shard_not_the_build(tiny_build, tmp_path, prefect_api):
    """Without --verify only sizes are checked, so publish meets the image: it checks each image it
    embeds against its name, and the flow removes the image and the marker of the shard that made
    it, redoes that shard and publishes again, in one log line and no traceback."""
    from collections import Counter

    from test_build import copy_build, music, task_runs_by_stage

    spec = copy_build(tiny_build, tmp_path)
    build_folder = tmp_path / "out" / "tiny"
    relative = damage_a_published_target(build_folder)
    done = music("build", str(spec))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logged = [line for line in (done.stdout + done.stderr).splitlines() if "has another sha256 than its name" in line]
    assert len(logged) == 1 and f"{relative} has another sha256 than its name: removed, redoing" in logged[0], logged
    assert "stages/synthesize/" in logged[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert task_runs_by_stage(prefect_api) == Counter({"synthesize": 1, "publish": 2})
    assert data_bytes(build_folder / "dataset") == tiny_build["bytes"]


# --- operational failures: one line, exit 2 --------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A 16 MiB tmpfs mounted at tmp_path/fs (root only), unmounted after the test."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def one_operational_line(done) -> str:
    """The run's one error line, after checking it is alone, names its log file, and no traceback was printed."""
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), done.stderr[-3000:]
    log = Path(errors[0].rsplit("(traceback in ", 1)[1].removesuffix(")"))
    assert "Traceback (most recent call last)" in log.read_text()
    return errors[0]


def test_a_disk_that_fills_mid_build_is_one_line_and_the_rerun_after_freeing_space_resumes(tmpfs, tmp_path, tiny_build):
    """Another job fills the disk once rerender has finished a shard (of a build resumed there, to save
    the suite the stages before): the build exits 2 with one line
    naming the folder, its free bytes and what to do (its traceback in a log file it names); once
    the space is freed, the same command publishes an undisturbed build's bytes."""
    import shutil

    from test_build import copy_build

    spec = copy_build(tiny_build, tmpfs)
    stages = tmpfs / "out" / "tiny" / "stages"
    shutil.rmtree(tmpfs / "out" / "tiny" / "dataset")
    shutil.rmtree(tmpfs / "out" / "tiny" / "releases")  # copied without its hard links: room the 16 MiB disk needs
    for stage in ("rerender", "annotate", "layout", "decimate", "filter", "publish"):  # work left to do, no model reloads before
        shutil.rmtree(stages / stage)
    build = start_build(spec, dict(os.environ))
    wait_for(stages, "rerender/*/*.done.json", build)
    filler = tmpfs / "filler"
    # the other job writes until the disk is full; unbuffered, so closing has no bytes left to fail on
    with filler.open("wb", buffering=0) as handle, pytest.raises(OSError, match="No space left"):
        while True:
            handle.write(bytes(1 << 16))
    _, stderr = build.communicate(timeout=300)
    done = subprocess.CompletedProcess(build.args, build.returncode, "", stderr)
    line = one_operational_line(done)
    assert f"the disk under {tmpfs / 'out' / 'tiny'} is full (" in line and "MiB free of 16.0 MiB" in line
    assert "free space" in line and "rerun the same command" in line
    print(f"full disk: {len(stderr.splitlines())} stderr lines: {line}")
    filler.unlink()
    resumed = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(spec)], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr and data_bytes(tmpfs / "out" / "tiny" / "dataset") == tiny_build["bytes"]


def test_a_read_only_output_folder_is_one_line_and_the_rerun_once_writable_resumes(tmpfs, tiny_build):
    from test_build import copy_build

    spec = copy_build(tiny_build, tmpfs)
    import shutil

    shutil.rmtree(tmpfs / "out" / "tiny" / "dataset")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(spec)], capture_output=True, text=True, timeout=300)
    line = one_operational_line(done)
    assert f"{tmpfs / 'out' / 'tiny' / '.build.lock'} is on a read-only file system: remount it read-write" in line
    print(f"read-only: {len(done.stderr.splitlines())} stderr lines: {line}")
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    resumed = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(spec)], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert data_bytes(tmpfs / "out" / "tiny" / "dataset") == tiny_build["bytes"]


def test_a_permission_denied_output_folder_is_one_line_and_the_rerun_with_access_resumes(tmp_path, tiny_build):
    """Root is denied only without CAP_DAC_OVERRIDE: the build runs under setpriv with it dropped,
    on a folder of another user's that it may read but not write."""
    import shutil

    from test_build import copy_build

    if not shutil.which("setpriv") or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to drop the capability that lets root write anywhere")
    spec = copy_build(tiny_build, tmp_path)
    folder = tmp_path / "out" / "tiny"
    shutil.rmtree(folder / "dataset")
    os.chown(folder, 4321, 4321)
    folder.chmod(0o555)
    denied = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    done = subprocess.run([*denied, sys.executable, "-m", "flows.cli", "build", str(spec)], capture_output=True, text=True,
                          timeout=300)
    line = one_operational_line(done)
    assert f"permission denied on {folder} (owned by uid 4321 with mode 555, this process runs as uid 0)" in line
    print(f"permission denied: {len(done.stderr.splitlines())} stderr lines: {line}")
    folder.chmod(0o755)
    resumed = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(spec)], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert data_bytes(folder / "dataset") == tiny_build["bytes"]
