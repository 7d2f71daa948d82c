"""File safety for every writer in the project, standard library only, at the bottom of the layers
(every package may import it; it imports nothing of ours and nothing heavy, so the server commands
that use it stay fast).

- `write_atomic(path, write)`: `write(tmp)` fills a temporary file beside `path`, which then replaces
  `path` in one `os.replace`: a reader, or a run killed midway, never sees half a file.
- `write_bytes` / `write_text`: the same for bytes or text in hand (`mode` sets the new file's
  permissions, e.g. 0o600 for files that hold credentials or addresses).
- `staged_folder(target)`: a context that yields an empty staging folder beside `target` and, when the
  block ends without an error, swaps it in for `target` whole; on an error the staging folder is
  removed and `target` is untouched.
- `sha256_file(path)`: the hex sha256 of a file, read in blocks.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_text(folder / "a.txt", "hello")
>>> with staged_folder(folder / "out") as staging:
...     write_text(staging / "b.txt", "world")
>>> sorted(p.name for p in folder.iterdir()), (folder / "out" / "b.txt").read_text()
(['a.txt', 'out'], 'world')
>>> sha256_file(folder / "a.txt")[:12]
'2cf24dba5fb0'
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["sha256_file", "staged_folder", "write_atomic", "write_bytes", "write_text"]


def _sibling(path: Path, tag: str) -> Path:
    # Per process and thread: two shards may write one content-addressed file (the same bytes) at once.
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{tag}")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    def write(tmp: Path) -> None:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode), "wb") as out:
            out.write(data)

    write_atomic(path, write)


def write_text(path: Path, text: str, mode: int | None = None) -> None:
    write_bytes(path, text.encode(), mode)


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield a fresh staging folder beside `target`; on success it replaces `target` whole (the old
    folder is moved aside first, then removed), on an error it is removed and `target` stays."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        old = _sibling(target, "old")
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(block):
            digest.update(chunk)
    return digest.hexdigest()
