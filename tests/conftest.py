"""Shared fixtures: an isolated state folder per test session and the zoo built in it once."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS_DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session", autouse=True)
def music_home(tmp_path_factory) -> Path:
    """Every test session gets its own `MUSIC_HOME` (zoo, server database, outputs)."""
    home = tmp_path_factory.mktemp("music_home")
    previous = {key: os.environ.get(key) for key in ("MUSIC_HOME", "MUSIC_ZOO_DIR")}
    os.environ["MUSIC_HOME"] = str(home)
    os.environ.pop("MUSIC_ZOO_DIR", None)
    yield home
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def zoo_root(music_home) -> Path:
    """The zoo folder that `zoo:<name>` resolves to in this session (entries build on first use)."""
    from music_model.paths import zoo_dir

    return zoo_dir()


@pytest.fixture(scope="session")
def dreambench_dir() -> Path:
    return TESTS_DATA / "dreambench"
