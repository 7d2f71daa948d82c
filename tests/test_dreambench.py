"""DreamBench: the upstream layout (full 30-subject table, 25 + 25 templates), the naming convention
for generated images, every bad input (a clear error before work, or a drop with its reason), and
scores of the real photos used as the "generated" folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_specs.eval import load_eval_spec, parse_eval_spec, parse_generator
from data_specs.roles import SpecError
from music_model.scoring.dreambench import (DreamBenchError, coverage, generated_path, load_dreambench, parse_prompts_and_classes,
                                    scan_generated, score_generated, summarise)
from music_model.scoring.metrics import Scorer

COMMON = {"device": "cpu", "dtype": "float32", "batch_size": 8}
LIVE = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}


@pytest.fixture(scope="module")
def bench(dreambench_dir):
    return load_dreambench(dreambench_dir)


def real_photos_as_generated(bench, folder: Path) -> Path:
    """Each subject's photo NN.jpg copied in as sample 0 of prompt NN."""
    for subject in bench.subjects.values():
        (folder / subject.name).mkdir(parents=True, exist_ok=True)
        for index, path in enumerate(subject.references):
            shutil.copy(path, folder / subject.name / f"{index:02d}_0.jpg")
    return folder


# --- layout -----------------------------------------------------------------------------------------


def test_the_upstream_table_and_templates_parse_in_full(dreambench_dir):
    classes, objects, live = parse_prompts_and_classes((dreambench_dir / "prompts_and_classes.txt").read_text())
    assert len(classes) == 30 and len(objects) == 25 and len(live) == 25
    assert {name for name, noun in classes.items() if noun in ("cat", "dog")} == LIVE
    assert classes["bear_plushie"] == "stuffed animal" and classes["pink_sunglasses"] == "glasses"
    assert objects[0] == live[0] == "a {0} {1} in the jungle"
    assert objects[24] == live[24] == "a cube shaped {0} {1}"
    assert live[11] == "a {0} {1} wearing a santa hat" and "wearing" not in " ".join(objects)


def test_the_subset_loads_and_prompts_carry_the_class_noun(bench):
    assert sorted(bench.subjects) == ["backpack", "cat", "dog", "dog6", "teapot", "vase"]
    assert all(len(s.references) == 3 for s in bench.subjects.values())
    assert len(bench.absent_subjects()) == 24
    assert bench.is_live("dog6") and not bench.is_live("teapot")
    assert bench.prompt("dog", 11) == "a dog wearing a santa hat"  # live template, class noun, no rare token
    assert bench.prompt("teapot", 11) == "a teapot with a tree and autumn leaves in the background"
    assert bench.prompt("vase", 0, "sks") == "a sks vase in the jungle"


def test_the_full_thirty_subject_layout_loads(tmp_path, dreambench_dir):
    shutil.copy(dreambench_dir / "prompts_and_classes.txt", tmp_path)
    classes, _, _ = parse_prompts_and_classes((dreambench_dir / "prompts_and_classes.txt").read_text())
    for k, name in enumerate(classes):
        (tmp_path / name).mkdir()
        for i in range(4 + k % 3):  # 4-6 photos, as upstream
            Image.new("RGB", (32 + i, 32), (k * 8, i * 40, 90)).save(tmp_path / name / f"{i:02d}.jpg")
    full = load_dreambench(tmp_path)
    assert len(full.subjects) == 30 and not full.absent_subjects()
    assert sum(full.is_live(s) for s in full.subjects) == 9
    grid = [generated_path(tmp_path / "gen", s, p, k) for s in full.subjects for p in range(25) for k in range(4)]
    assert len(set(grid)) == 30 * 25 * 4 and grid[0].relative_to(tmp_path) == Path("gen/backpack/00_0.png")


# --- bad inputs ---------------------------------------------------------------------------------------


def copy_bench(dreambench_dir: Path, target: Path) -> Path:
    shutil.copytree(dreambench_dir, target, ignore=shutil.ignore_patterns("*.md", "references_and_licenses.txt"))
    return target


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda root: shutil.rmtree(root), "DreamBench folder not found"),
        (lambda root: (root / "prompts_and_classes.txt").unlink(), "no prompts_and_classes.txt"),
        (lambda root: (root / "prompts_and_classes.txt").write_text("Classes\n\nname,noun\n"), "no 'subject_name,class' table"),
        (lambda root: (root / "dog4").mkdir(), "dog4: folder is not a subject"),
        (lambda root: [p.unlink() for p in (root / "vase").iterdir()], "subject 'vase' has no reference images"),
        (lambda root: (root / "cat" / "01.jpg").write_bytes((root / "cat" / "01.jpg").read_bytes()[:3000]), "subject 'cat': reference unreadable_image"),
        (lambda root: (root / "cat" / "02.jpg").write_bytes(b"not a jpeg"), "subject 'cat': reference unreadable_image"),
        (lambda root: (root / "teapot" / "notes.txt").write_text("x"), "not an image file among the references: notes.txt"),
    ],
    ids=["missing-root", "no-table", "bad-table", "stray-folder", "no-references", "truncated-reference",
         "corrupt-reference", "non-image-reference"],
)
def test_a_broken_benchmark_fails_before_any_model_loads(tmp_path, dreambench_dir, breakage, message):
    root = copy_bench(dreambench_dir, tmp_path / "bench")
    breakage(root)
    with pytest.raises(DreamBenchError, match=message):
        load_dreambench(root)


def test_bad_generated_files_are_dropped_with_their_reasons(tmp_path, bench):
    folder = real_photos_as_generated(bench, tmp_path / "gen")
    (folder / "dog" / "photo.png").write_bytes((folder / "dog" / "00_0.jpg").read_bytes())  # wrong name
    (folder / "dog" / "05_0.txt").write_text("not an image")  # non-image file
    (folder / "loose.png").write_bytes(b"")  # not in a subject folder
    (folder / "dog3").mkdir()
    (folder / "dog3" / "00_0.png").write_bytes(b"x")  # a DreamBench subject with no photos here
    (folder / "dragon").mkdir()
    (folder / "dragon" / "00_0.png").write_bytes(b"x")  # not a DreamBench subject
    (folder / "cat" / "30_0.png").write_bytes(b"x")  # prompt index past the 25 templates
    (folder / "cat" / "00_0.png").write_bytes(b"x")  # same cell as cat/00_0.jpg
    (folder / "vase" / ".00_1.png.tmp").write_bytes(b"x")  # a half-written file is hidden, not scored
    scan = scan_generated(bench, folder)
    assert len(scan.images) == 18
    reasons = {Path(d["path"]).relative_to(folder).as_posix(): d["reason"] for d in scan.drops}
    assert reasons == {
        "dog/photo.png": "bad_name", "dog/05_0.txt": "not_an_image", "loose.png": "bad_name",
        "dog3/00_0.png": "no_references", "dragon/00_0.png": "unknown_subject",
        "cat/30_0.png": "prompt_index_out_of_range", "cat/00_0.png": "duplicate",
    }
    assert all(d["detail"] for d in scan.drops)


def test_a_folder_with_nothing_to_score_is_an_error(tmp_path, bench):
    with pytest.raises(DreamBenchError, match="generated images folder not found"):
        scan_generated(bench, tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DreamBenchError, match="the folder is empty"):
        scan_generated(bench, tmp_path / "empty")
    (tmp_path / "wrong" / "dog").mkdir(parents=True)
    (tmp_path / "wrong" / "dog" / "dog_in_jungle.png").write_bytes(b"x")
    with pytest.raises(DreamBenchError, match=r"no file follows .*'bad_name': 1"):
        scan_generated(bench, tmp_path / "wrong")


# --- scores -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer():
    return Scorer.from_specs({"role": "dino", "backend": "transformers", "model": "zoo:dino_vits16", **COMMON},
                             {"role": "clip", "backend": "transformers", "model": "zoo:clip_b32", **COMMON})


def test_real_photos_as_generated_images(tmp_path, bench, scorer):
    folder = real_photos_as_generated(bench, tmp_path / "gen")
    scan = scan_generated(bench, folder)
    rows, drops = score_generated(scorer, bench, scan.images)
    assert len(rows) == 18 and not drops
    subjects, overall = summarise(rows, bench, samples=200)
    by_name = {row["subject"]: row for row in subjects}
    for row in subjects:
        assert row["images"] == 3 and row["pairs"] == 9
        assert -1 <= row["dino"] <= 1 + 1e-6 and -1 <= row["clip_i"] <= 1 + 1e-6 and -1 <= row["clip_t"] <= 1
    assert overall["all"]["subjects"] == 6 and overall["live"]["subjects"] == 3 and overall["object"]["subjects"] == 3
    for metric in ("dino", "clip_i", "clip_t"):
        estimate = overall["all"][metric]
        assert estimate["mean"] == pytest.approx(np.mean([by_name[s][metric] for s in by_name]))  # mean over subjects
        assert estimate["ci_low"] <= estimate["mean"] <= estimate["ci_high"]
    first = next(r for r in rows if r["subject"] == "dog" and r["prompt_index"] == 0)
    assert first["prompt"] == "a dog in the jungle" and first["references"] == 3
    assert all(c["prompts_covered"] == 3 and c["missing_cells"] == 22 for c in coverage(bench, scan.images))


def test_unreadable_generated_images_are_dropped_and_the_rest_scored(tmp_path, bench, scorer):
    folder = real_photos_as_generated(bench, tmp_path / "gen")
    jpeg = (folder / "dog" / "00_0.jpg").read_bytes()
    (folder / "dog" / "00_0.jpg").write_bytes(jpeg[: len(jpeg) // 3])  # truncated
    (folder / "cat" / "01_0.jpg").write_bytes(b"\xff\xd8\xff\xe0 corrupt")  # corrupt
    (folder / "vase" / "03_0.png").write_bytes(b"")  # empty
    scan = scan_generated(bench, folder)
    (folder / "teapot" / "02_0.jpg").unlink()  # deleted between the scan and the scoring
    rows, drops = score_generated(scorer, bench, scan.images)
    assert len(rows) == 15
    assert sorted((Path(d["path"]).relative_to(folder).as_posix(), d["reason"]) for d in drops) == [
        ("cat/01_0.jpg", "unreadable_image"), ("dog/00_0.jpg", "unreadable_image"),
        ("teapot/02_0.jpg", "missing_file"), ("vase/03_0.png", "unreadable_image")]
    assert "truncated" in next(d["detail"] for d in drops if "dog" in d["path"])


# --- spec ---------------------------------------------------------------------------------------------


def test_eval_specs_parse_and_bad_ones_name_the_field():
    real, tiny = load_eval_spec("eval_dreambench.yaml"), load_eval_spec("eval_tiny.yaml")
    assert real.roles["dino"].model == "facebook/dino-vits16" and real.roles["clip"].model == "openai/clip-vit-base-patch32"
    assert real.roles["clip_select"].model == "openai/clip-vit-large-patch14" and real.roles["dino"].dtype == "float32"
    assert tiny.roles["dino"].model == "zoo:dino_vits16" and tiny.roles["clip"].model == "zoo:clip_b32"
    data = tiny.model_dump()
    with pytest.raises(SpecError, match=r"roles.clip.batch_size: must be a positive integer"):
        parse_eval_spec({**data, "roles": {**data["roles"], "clip": {**data["roles"]["clip"], "batch_size": 0}}})
    with pytest.raises(SpecError, match="roles: missing detector"):
        parse_eval_spec({**data, "roles": {k: v for k, v in data["roles"].items() if k != "detector"}})
    with pytest.raises(SpecError, match="roles.dino: must be a dino role"):
        parse_eval_spec({**data, "roles": {**data["roles"], "dino": data["roles"]["clip"]}})
    with pytest.raises(SpecError, match="generation.prompt_indices"):
        parse_eval_spec({**data, "generation": {"prompt_indices": [25]}})
    assert parse_generator("editor=zoo:flux_kontext").role == "editor"
    with pytest.raises(SpecError, match="generator.role"):
        parse_generator("painter=zoo:flux")
