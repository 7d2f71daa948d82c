"""Where the project keeps state: the zoo, the local Prefect server's database, run outputs."""
from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """`$MUSIC_HOME`, else `~/.cache/music`."""
    root = os.environ.get("MUSIC_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "music"


def zoo_dir() -> Path:
    """`$MUSIC_ZOO_DIR`, else `<state>/zoo`."""
    root = os.environ.get("MUSIC_ZOO_DIR")
    return Path(root).expanduser() if root else state_dir() / "zoo"
