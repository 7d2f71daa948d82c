"""`tasks.engine.faults`: which failures are conditions of the machine (one line, exit 2, the traceback in
a log file) and which are bugs of ours (raised as they are); a check never trusts what it rejected."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tasks.engine.faults import describe, operational_exit


def test_each_condition_is_named_with_what_the_machine_has_and_a_bug_is_not(tmp_path):
    missing = str(tmp_path / ".part-00000.parquet.1.2.tmp")  # a temporary file: its folder is named
    assert describe(OSError(errno.ENOSPC, "No space left on device"), tmp_path).startswith(f"the disk under {tmp_path} is full (")
    assert describe(OSError(errno.EROFS, "Read-only file system", missing), tmp_path).startswith(
        f"{tmp_path} is on a read-only file system")
    denied = describe(PermissionError(errno.EACCES, "Permission denied", missing), tmp_path)
    assert denied.startswith(f"permission denied on {tmp_path} (owned by uid {os.stat(tmp_path).st_uid} with mode "
                             f"{os.stat(tmp_path).st_mode & 0o7777:o}, this process runs as uid {os.geteuid()})")
    assert "in use or locked by another process" in describe(OSError(errno.EBUSY, "busy", missing), tmp_path)
    assert describe(MemoryError(), tmp_path).startswith("host memory exhausted (")
    assert describe(RuntimeError("CUDA error: unspecified launch failure"), tmp_path).startswith("the GPU failed")
    assert all(line.endswith("the run resumes") for line in [denied, describe(MemoryError(), tmp_path)])
    for bug in (ValueError("bad"), KeyError("id"), FileNotFoundError(errno.ENOENT, "gone", missing), RuntimeError("shape")):
        assert describe(bug, tmp_path) is None
        with pytest.raises(type(bug)):
            with operational_exit(tmp_path):
                raise bug


def test_a_condition_exits_2_in_one_line_naming_its_log(tmp_path):
    code = textwrap.dedent(f"""
        import errno
        from pathlib import Path
        from tasks.engine.faults import operational_exit
        with operational_exit(Path({str(tmp_path)!r})):
            raise OSError(errno.ENOSPC, "No space left on device")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MUSIC_HOME": str(tmp_path / "home")})
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: the disk under {tmp_path} is full")
    log = lines[0].rsplit("(traceback in ", 1)[1].removesuffix(")")
    assert log.startswith(str(tmp_path / "logs")) and "OSError: [Errno 28]" in open(log).read()


def test_an_image_that_fails_its_check_is_removed_so_the_redo_writes_it_anew(chain, tmp_path):
    """A stored image damaged at equal size fails its sha256 under verify: it goes with the marker,
    and the redone shard stores it again (the store keeps a name it holds, so it must be gone)."""
    from test_contract import _shard_spec

    from tasks.engine.build_paths import stage_dir
    from tasks.engine.contract import run_shard
    from tasks.engine.markers import check_shard
    from tasks.stages import STAGES

    spec, out = chain
    summary, _, _, folder = out["synthesize"]
    spec = _shard_spec(spec, tmp_path)
    shutil.copytree(folder, stage_dir(spec, "synthesize", summary["fingerprint"]))
    shutil.copytree(folder.parents[2] / "images", tmp_path / spec.name / "images")
    relative = sorted(summary["images"])[0]
    stored = tmp_path / spec.name / relative
    good = stored.read_bytes()
    stored.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    assert check_shard(spec, "synthesize", summary["fingerprint"], 0)[0] is not None  # its size still holds
    marker, problem = check_shard(spec, "synthesize", summary["fingerprint"], 0, verify=True)
    assert marker is None and f"{relative} has another sha256 than its name" in problem and not stored.exists()
    synthesize = next(s for s in STAGES if s.name == "synthesize")
    redone = run_shard(synthesize, spec, 0, summary["fingerprint"], out["compose"][3])
    assert not redone["skipped"] and stored.read_bytes() == good
