"""The zoo: every entry builds, two builds are byte-identical, the whole zoo stays small."""
import json

from PIL import Image

from music_model.zoo import ENTRIES, build_zoo, file_hashes


def test_two_builds_are_byte_identical_and_small(tmp_path):
    first = json.loads(build_zoo(tmp_path / "a").read_text())
    second = json.loads(build_zoo(tmp_path / "b").read_text())
    assert sorted(first) == sorted(ENTRIES)
    assert first == second
    for name in ENTRIES:
        assert file_hashes(tmp_path / "a" / name) == file_hashes(tmp_path / "b" / name)
    size = sum(p.stat().st_size for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert size <= 50e6, f"zoo is {size / 1e6:.1f} MB"


def test_zoo_spec_builds_entry_on_first_use(tmp_path, monkeypatch):
    from data_specs.roles import parse_role_spec
    from music_model.roles import load_role

    root = tmp_path / "fresh-zoo"  # not the session's zoo, which earlier tests have built
    monkeypatch.setenv("MUSIC_ZOO_DIR", str(root))
    assert not root.exists()
    role = load_role(parse_role_spec({"role": "dino", "backend": "transformers", "model": "zoo:dino_vits16", "device": "cpu",
                                         "batch_size": 7}))  # a spec no other test loads: not served from the cache
    assert role.path == str(root / "dino_vits16")
    assert json.loads((root / "dino_vits16" / "zoo_entry.json").read_text())
    assert role.embed_images([Image.new("RGB", (32, 32))]).shape[0] == 1  # what was built is the loadable checkpoint
