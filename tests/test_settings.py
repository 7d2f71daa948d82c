"""Every `MUSIC_*` environment variable is read in one module, `music_model.settings`, and the
README's table lists each with its default."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from music_model.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^MUSIC_[A-Z_]+$")


def test_no_module_but_settings_names_a_music_variable():
    named = {}
    for package in ("flows", "tasks", "music_model", "data_specs"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "music_model" / "settings.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and NAME.match(node.value):
                    named.setdefault(node.value, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not named, f"read MUSIC_* variables through music_model.settings: {named}"


def test_the_readme_lists_every_setting_with_its_default():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(MUSIC_[A-Z_]+)` \| ([^|]*) \|", readme, re.M))
    assert set(rows) == {s.name for s in SETTINGS}
    for setting in SETTINGS:
        assert rows[setting.name].strip() == (f"`{setting.default}`" if setting.default else "-"), setting.name
