"""A build's images: they live once per build in `ImageStore`, each stored once, by content; rows
name them by path. A shard's marker records the size of each image it stored (`image_problem`
holds the image to it), and a stored image found damaged is forgotten with the markers of the
shards that made it (`forget_image`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_specs.build import BuildSpec
from music_model.media.images import from_struct, to_struct
from safe_files import sha256_file, write_atomic
from tasks.engine.build_paths import build_dir


class ImageStore:
    """A build's images, each stored once, by content: `images/<aa>/<sha256>.png` under the build
    folder. A stage row holds `{"bytes": None, "path": "images/aa/<sha256>.png"}` (the path form of
    the Hugging Face image layout, relative to the build folder), so a target and every decimated
    sibling of it, in every stage's shard, share one file; a row with its bytes inline is read as is.
    A shard's paths are relative to the build folder it lives in (`of_stage_dir`)."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def of_stage_dir(cls, folder: Path) -> "ImageStore":
        """The store of the build whose `stages/<stage>/<fingerprint>` folder is `folder`."""
        return cls(folder.parents[2])

    def put(self, image) -> dict:
        """Store `image` (PNG, as `to_struct` encodes it) unless it is stored already; the struct naming it."""
        data = to_struct(image)["bytes"]
        digest = hashlib.sha256(data).hexdigest()
        relative = f"images/{digest[:2]}/{digest}.png"
        path = self.root / relative
        if not path.exists() or path.stat().st_size != len(data):
            write_atomic(path, lambda tmp: tmp.write_bytes(data))
        return {"bytes": None, "path": relative}

    def read_bytes(self, struct: dict) -> bytes:
        return struct["bytes"] if struct.get("bytes") is not None else (self.root / struct["path"]).read_bytes()

    def open(self, struct: dict):
        return from_struct({"bytes": self.read_bytes(struct)})

    def embedded(self, struct: dict) -> dict:
        """The struct with its bytes inline, as published files hold it; a stored image whose bytes
        are not its name's (damaged at equal size, which only its sha256 shows) raises `DamagedImage`."""
        data = self.read_bytes(struct)
        if struct.get("bytes") is None and hashlib.sha256(data).hexdigest() != Path(struct["path"]).stem:
            raise DamagedImage(struct["path"])
        return {"bytes": data, "path": None}


class DamagedImage(ValueError):
    """A stored image's bytes have another sha256 than its name: `forget_image` it and redo its shard."""

    def __init__(self, relative: str):
        super().__init__(f"{relative} has another sha256 than its name")
        self.relative = relative


def image_store(spec: BuildSpec) -> ImageStore:
    return ImageStore(build_dir(spec))


def image_problem(root: Path, relative: str, size: int, verify: bool) -> str | None:
    """Why a stored image is not what its shard's marker recorded (the name is its sha256), or None."""
    path = root / relative
    if not path.exists():
        return f"{relative} is missing"
    if path.stat().st_size != size:
        return f"{relative} is {path.stat().st_size} bytes, its marker says {size}"
    if verify and sha256_file(path) != path.stem:
        return f"{relative} has another sha256 than its name"
    return None


def forget_image(root: Path, relative: str) -> str:
    """Remove a stored image found damaged (`DamagedImage`) and the markers of the shards that made
    it, so the next pass redoes them and writes it anew; the log line saying so."""
    (root / relative).unlink(missing_ok=True)
    makers = []
    for marker in sorted((root / "stages").glob("*/*/*.done.json")):
        try:
            made = relative in json.loads(marker.read_text()).get("images", {})
        except (OSError, json.JSONDecodeError):
            continue
        if made:
            marker.unlink(missing_ok=True)
            makers.append(marker.relative_to(root).as_posix())
    return f"{relative} has another sha256 than its name: removed, redoing the shards that made it ({', '.join(makers) or 'none found'})"
