"""The tiny model zoo: deterministic, randomly initialised checkpoints for every role and backend.

Each entry is written in its real on-disk format (`save_pretrained` folders with offline-built
tokenizers and processors, open_clip config + weights, segment-anything weights) and keeps the real
model's input resolution, patch size and preprocessing; only width and depth shrink. The outputs
are noise: the zoo proves the machinery, real checkpoints give real data.

`ensure_entry(name)` builds one entry on first use (safe across processes and threads);
`build_zoo(root)` builds them all and writes `manifest.json` with a sha256 per file. `arch` makes
real-size architectures with random weights, straight on a device (GPU checks and `music plan`).

May import only the top-level `paths`: `roles` loads from the zoo, so the zoo never imports it.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import threading
from pathlib import Path

from filelock import FileLock

from safe_files import sha256_file, staged_folder, write_text
from music_model.paths import zoo_dir

ZOO_SEED = 20260407

# name -> "module:builder"; a builder writes the entry into the folder it is given.
ENTRIES: dict[str, str] = {
    "qwen3": "music_model.zoo.text:build_qwen3",
    "qwen2_5_vl": "music_model.zoo.text:build_qwen2_5_vl",
    "flux": "music_model.zoo.diffusion:build_flux",
    "flux_kontext": "music_model.zoo.diffusion:build_flux_kontext",
    "grounding_dino": "music_model.zoo.vision:build_grounding_dino",
    "sam2": "music_model.zoo.vision:build_sam2",
    "sam": "music_model.zoo.vision:build_sam",
    "sam_official": "music_model.zoo.vision:build_sam_official",
    "clip_b32": "music_model.zoo.embed:build_clip_b32",
    "clip_l14": "music_model.zoo.embed:build_clip_l14",
    "open_clip_b32": "music_model.zoo.embed:build_open_clip_b32",
    "dino_vits16": "music_model.zoo.embed:build_dino_vits16",
}

_MARKER = "zoo_entry.json"
_thread_lock = threading.Lock()


def entry_seed(name: str) -> int:
    """A seed per entry, stable across machines and Python runs."""
    digest = hashlib.sha256(f"{ZOO_SEED}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by its relative POSIX path, sorted."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        hashes[path.relative_to(folder).as_posix()] = sha256_file(path)
    return hashes


def _build_into(name: str, target: Path) -> None:
    import torch

    module_name, function_name = ENTRIES[name].split(":")
    builder = getattr(importlib.import_module(module_name), function_name)
    with staged_folder(target) as staging:  # replaces a forced rebuild, or an earlier build that died before its marker
        torch.manual_seed(entry_seed(name))
        builder(staging, entry_seed(name))
        hashes = file_hashes(staging)
        (staging / _MARKER).write_text(json.dumps({"name": name, "files": hashes}, indent=1, sort_keys=True) + "\n")


def ensure_entry(name: str, root: Path | None = None, force: bool = False) -> Path:
    """The folder of zoo entry `name`, built first if it is not complete (or when `force`)."""
    if name not in ENTRIES:
        raise KeyError(f"zoo has no entry {name!r}; entries: {', '.join(sorted(ENTRIES))}")
    root = Path(root) if root else zoo_dir()
    target = root / name
    if (target / _MARKER).exists() and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _thread_lock, FileLock(str(root / f".{name}.lock")):
        if force or not (target / _MARKER).exists():
            _build_into(name, target)
    return target


def write_manifest(root: Path | None = None) -> Path:
    """`manifest.json`: the sha256 of every file of every built entry under `root`."""
    root = Path(root) if root else zoo_dir()
    manifest = {name: file_hashes(root / name) for name in sorted(ENTRIES) if (root / name / _MARKER).exists()}
    path = root / "manifest.json"
    write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def build_zoo(root: Path | None = None, names: list[str] | None = None, force: bool = False) -> Path:
    """Build every entry (or `names`) under `root` and write the manifest; returns its path."""
    for name in names or sorted(ENTRIES):
        ensure_entry(name, root, force)
    return write_manifest(root)
