"""Preview sheets: the drawing (layout cells in their subject's colour, every reference shown), the
previews a publish writes into the dataset and its card, and `music show` on a published training
set and MSIC benchmark (the tiny stage chain, published without Prefect)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from music_model.media.images import TAG_COLOURS
from music_model.subjects.preview import SheetSample, layout_overlay, render_sheet

GREY = (128, 128, 128)


def sample(references: int, layout: list[int] | None = None) -> SheetSample:
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    return SheetSample(
        id="s-1", target=Image.new("RGB", (256, 256), GREY), categories=[f"thing {k}" for k in range(references)],
        references=[Image.new("RGB", (90, 30), colours[k % 3]) for k in range(references)],
        layout=layout or [1] + [0] * 62 + [2], instruction="Put <s1> left of <s2>.", cot='{"subjects": []}',
        boxes=[[0.0, 0.0, 0.2, 0.2], [0.8, 0.8, 1.0, 1.0]][:references])


def test_layout_overlay_tints_each_subjects_cells_in_its_colour_and_leaves_background_clear():
    image = Image.new("RGB", (256, 256), GREY)  # 32 px cells
    pixels = np.asarray(layout_overlay(image, [1] + [0] * 62 + [2], 8)).astype(int)
    one, two, background = pixels[4, 4], pixels[230, 230], pixels[140, 140]  # away from the grid lines and digits
    # Cell 0 moves from grey toward subject 1's colour, cell 63 toward subject 2's; background stays grey.
    for pixel, colour in ((one, TAG_COLOURS[0]), (two, TAG_COLOURS[1])):
        assert np.all(np.sign(pixel - np.array(GREY)) == np.sign(np.array(colour) - np.array(GREY))), (pixel, colour)
    assert tuple(background) == GREY


def test_sheet_shows_every_reference_and_grows_with_them():
    few, many = render_sheet(sample(2)), render_sheet(sample(7, [1, 2, 3, 4, 5, 6, 7] + [0] * 57))
    assert few.width == many.width and many.height > few.height  # 7 references wrap onto a second row
    blue = np.all(np.asarray(few) == (0, 0, 255), axis=-1).sum()
    # The 90x30 blue reference letterboxed into a 160 px thumbnail: 160 x 53 pixels of pure blue.
    assert blue >= 160 * 50


@pytest.mark.parametrize("change, message", [({"layout": [0] * 10}, "not a square grid"),
                                             ({"categories": ["one"]}, "2 references for 1 categories")])
def test_sheet_refuses_inconsistent_samples(change, message):
    broken = sample(2)
    for key, value in change.items():
        setattr(broken, key, value)
    with pytest.raises(ValueError, match=message):
        render_sheet(broken)


@pytest.fixture(scope="module")
def published(chain, tmp_path_factory):
    """The tiny chain's filter output published as a training set and as a 2-3 subject benchmark."""
    from data_specs.build import MsicParams
    from tasks.publishing.msic import publish_msic
    from tasks.publishing.publish import publish

    spec, stages = chain
    root = tmp_path_factory.mktemp("published")
    spec = spec.model_copy(update={"output_root": str(root)})
    summaries = [summary for summary, _, _, _ in stages.values()]
    filter_dir = stages["filter"][3]
    stats = publish(spec, filter_dir, 1, summaries, "preview-test")
    bench = spec.model_copy(update={"name": "bench", "msic": MsicParams(strata=[2, 3], cases_per_stratum=2)})
    result = publish_msic(bench, filter_dir, 1, "preview-test")
    return root / spec.name / "dataset", stats, result


def test_publish_writes_a_seeded_preview_shown_in_the_card(published):
    dataset, stats, result = published
    from tasks.publishing.publish import PREVIEW_SAMPLES, preview_ids

    ids = [p.stem for p in (dataset / "preview").glob("*.png")]
    assert stats["preview"] == [f"preview/{i}.png" for i in sorted(ids)]
    assert len(ids) == min(PREVIEW_SAMPLES, stats["samples"]) > 0
    assert json.loads((dataset / "stats.json").read_text())["preview"] == stats["preview"]
    card = (dataset / "README.md").read_text()
    assert "## Preview" in card and all(f"]({p})" in card for p in stats["preview"])
    assert "docs/FIDELITY.md" in card
    # The subset is a seeded draw, not the first IDs, and the same on every rebuild.
    assert preview_ids(0, ["c", "a", "b", "d"], 2) == preview_ids(0, ["d", "b", "a", "c"], 2)
    msic = Path(result["msic"])
    assert result["preview"] and all((msic / p).exists() for p in result["preview"])
    assert "## Preview" in (msic / "README.md").read_text()


def test_music_show_renders_the_previewed_samples_or_the_ones_asked_for(published, tmp_path):
    from flows.cli.main import app

    dataset, stats, result = published
    runner = CliRunner()
    done = runner.invoke(app, ["show", str(dataset), "--out", str(tmp_path / "a")])
    assert done.exit_code == 0, done.output
    shown = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert shown == sorted(p.rsplit("/", 1)[1] for p in stats["preview"])
    # The same sheet as the build published, pixel for pixel.
    first = shown[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / first)), np.asarray(Image.open(dataset / "preview" / first)))

    case_ids = [p.rsplit("/", 1)[1][:-4] for p in result["preview"]][:2]
    done = runner.invoke(app, ["show", result["msic"], "--ids", ",".join(case_ids), "--out", str(tmp_path / "b")])
    assert done.exit_code == 0, done.output
    assert sorted(p.stem for p in (tmp_path / "b").glob("*.png")) == sorted(case_ids)

    done = runner.invoke(app, ["show", str(dataset), "--ids", "no-such-sample", "--out", str(tmp_path / "c")])
    assert done.exit_code == 2 and "no-such-sample" in done.output
    done = runner.invoke(app, ["show", str(tmp_path), "--out", str(tmp_path / "c")])
    assert done.exit_code == 2 and "no published training set" in done.output
    assert not (tmp_path / "c").exists()
