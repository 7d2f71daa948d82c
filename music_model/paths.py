"""Where the project keeps state: the zoo, the local Prefect server's database, run outputs."""
from __future__ import annotations

from pathlib import Path

from music_model import settings


def folder_bytes(folder: Path) -> int:
    """The bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def state_dir() -> Path:
    """`$MUSIC_HOME`, else `~/.cache/music`."""
    return Path(settings.HOME.get()).expanduser()


def zoo_dir() -> Path:
    """`$MUSIC_ZOO_DIR`, else `<state>/zoo`."""
    root = settings.ZOO_DIR.get()
    return Path(root).expanduser() if root else state_dir() / "zoo"
