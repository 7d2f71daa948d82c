"""The one file-safety module: a failed write leaves the old file or folder whole, never half a new one."""
from __future__ import annotations

import doctest
import os

import pytest

import safe_files
from safe_files import sha256_file, staged_folder, write_atomic, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "marker.json"
    write_text(path, "old")

    def half_then_fail(tmp):
        tmp.write_text("ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker.json"]


def test_a_folder_is_swapped_in_whole_or_not_at_all(tmp_path):
    target = tmp_path / "dataset"
    with staged_folder(target) as staging:
        write_text(staging / "a.parquet", "v1")
    with pytest.raises(RuntimeError):
        with staged_folder(target) as staging:
            write_text(staging / "a.parquet", "v2")
            raise RuntimeError("killed midway")
    assert (target / "a.parquet").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
    with staged_folder(target) as staging:
        write_text(staging / "b.parquet", "v3")
    assert sorted(p.name for p in target.iterdir()) == ["b.parquet"]


def test_permissions_and_hash(tmp_path):
    write_text(tmp_path / "server.json", "{}", mode=0o600)
    assert os.stat(tmp_path / "server.json").st_mode & 0o777 == 0o600
    assert sha256_file(tmp_path / "server.json") == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    assert doctest.testmod(safe_files).failed == 0
