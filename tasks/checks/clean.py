"""What a build folder holds that its spec no longer uses: stage outputs of fingerprints the spec
does not make (an old parameter, an older code version, a stage no longer in the list) and stored
images no current shard names, and releases beyond the spec's `release.keep` (never the current one). `music clean SPEC` lists them with the bytes they hold and, with
`--yes`, removes them; the build then still resumes to the same bytes."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from data_specs.build import BuildSpec
from music_model.paths import folder_bytes
from tasks.engine.build_paths import build_dir
from tasks.engine.contract import num_shards
from tasks.publishing import releases
from tasks.publishing.msic import msic_fingerprint
from tasks.publishing.publish import publish_fingerprint
from tasks.stages import stage_chain


def current_fingerprints(spec: BuildSpec) -> dict[str, str]:
    """Stage (and publish step) -> the fingerprint this spec builds it under."""
    chain = stage_chain(spec)
    current, upstream = {link.stage.name: link.fingerprint for link in chain}, chain[-1].fingerprint
    if spec.msic:
        current["publish-msic"] = msic_fingerprint(spec, upstream, num_shards(spec))
    else:
        # A target build publishes from the shards its waves made: the published marker says which.
        published = json.loads(marker.read_text()) if (marker := build_dir(spec) / "dataset" / releases.DONE).exists() else {}
        current["publish"] = (published.get("fingerprint") if spec.target else None) or publish_fingerprint(spec, upstream, num_shards(spec))
    return current


def published_folder(spec: BuildSpec) -> Path:
    return build_dir(spec) / ("msic" if spec.msic else "dataset")


def named_images(part: Path) -> set[str]:
    """The stored images a stage part's rows name (targets and references)."""
    columns = [c for c in ("image", "subjects") if c in pq.read_schema(part).names]
    names = set()
    for row in pq.read_table(part, columns=columns).to_pylist():
        structs = [row.get("image")] + [s.get("reference") for s in row.get("subjects") or []]
        names.update(s["path"] for s in structs if s and s.get("path") and s.get("bytes") is None)
    return names


@dataclass
class Unused:
    stale: list[tuple[Path, int]] = field(default_factory=list)  # (stage folder, bytes)
    images: list[tuple[Path, int]] = field(default_factory=list)  # (image file, bytes)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.stale) + sum(size for _, size in self.images)


def find_unused(spec: BuildSpec) -> Unused:
    root, current = build_dir(spec), current_fingerprints(spec)
    unused, named = Unused(), set()
    for stage_folder in sorted((root / "stages").glob("*")):
        for folder in sorted(p for p in stage_folder.iterdir() if p.is_dir()):
            if current.get(stage_folder.name) == folder.name:
                for part in folder.glob("part-*[0-9].parquet"):
                    named |= named_images(part)
            else:
                unused.stale.append((folder, folder_bytes(folder)))
    unused.images = [(p, p.stat().st_size) for p in sorted((root / "images").rglob("*.png"))
                     if p.relative_to(root).as_posix() not in named]
    # Bytes a newer release shares by hard link are counted here though they stay on disk.
    unused.stale += [(release, folder_bytes(release)) for release in releases.unkept(published_folder(spec), spec.release.keep)]
    return unused


def remove(unused: Unused) -> None:
    for folder, _ in unused.stale:
        shutil.rmtree(folder)
    for path, _ in unused.images:
        path.unlink(missing_ok=True)

