"""Real-model data quality, one test per fix (issue 11): un-stretched references at Kontext's
preferred resolutions, legible subject tags with pixel boxes in the annotate prompt, token budgets
that hold the largest valid answer, explicit sampling, curated category names, decimation by box
area with a fresh layout, and a renderer LoRA that reloads at its trained strength."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data_specs import shipped
from data_specs.schemas import WORK
from music_model.media import masks as rle
from music_model.media.images import TAG_COLOURS, TAG_HEIGHT, draw_labelled_boxes, square, to_struct
from music_model.roles.structured import DecodeOptions, decode_settings, max_json_bytes, schema_token_budget
from music_model.subjects.layout import box_to_mask, layout_grid
from tasks.engine.build_paths import stage_dir
from tasks.engine.contract import StageContext, fingerprint, read_rows, run_shard, write_table
from tasks.engine.image_store import image_store
from tasks.stages import annotate, compose, decimate, parse_build_spec, rerender


def tiny_spec(tmp_path, **changes):
    data = yaml.safe_load(shipped("tiny.yaml").read_text())
    data.update({"name": "quality", "num_source_images": 1, "shard_size": 1, "output_root": str(tmp_path), **changes})
    return parse_build_spec(data)


# --- 1. rerender: letterboxed crops at Kontext's preferred resolutions, references keep their aspect


def test_kontext_renders_a_crop_at_the_preferred_resolution_of_its_aspect():
    assert rerender.render_resolution(3.0, 1024, 16) == (1568, 672)  # the widest Kontext bucket
    assert rerender.render_resolution(1 / 3, 1024, 16) == (672, 1568)
    assert rerender.render_resolution(1.0, 1024, 16) == (1024, 1024)
    assert rerender.render_resolution(1.5, 1024, 16) == (1248, 832)
    assert rerender.render_resolution(3.0, 64, 16) == (96, 48)  # tiny specs: the same buckets, scaled down


@pytest.mark.parametrize("size,render_size", [(64, 64), (512, 1024)])  # the tiny spec's sizes, then the paper spec's
def test_a_three_to_one_subject_keeps_its_aspect_in_its_reference(tmp_path, size, render_size):
    spec = tiny_spec(tmp_path, rerender={"size": size, "render_size": render_size, "crop_margin": 0.0, "min_dino": -1.0, "max_dino": 1.0})
    image = Image.new("RGB", (256, 256), (30, 90, 160))
    wide, tall = [0.25, 0.125, 1.0, 0.375], [0.0, 0.25, 0.25, 1.0]  # 192x64 and 64x192 px: 3:1 and 1:3
    row = {"id": "q-0", "index": 0, "source_id": "q-0", "num_subjects": 2, "image": to_struct(image), "width": 256, "height": 256,
           "subjects": [{"id": 1, "category": "bench", "box": wide}, {"id": 2, "category": "lamp", "box": tall}]}
    upstream = tmp_path / "upstream"
    write_table([row], WORK, upstream / "part-00000.parquet")
    fp = fingerprint(rerender.STAGE, spec, "test")
    run_shard(rerender.STAGE, spec, 0, fp, upstream)
    [out] = read_rows(stage_dir(spec, "rerender", fp) / "part-00000.parquet")
    sizes = [image_store(spec).open(s["reference"]).size for s in out["subjects"]]
    print(f"render_size {render_size}: 3:1 and 1:3 crops -> references {sizes}")
    (w1, h1), (w2, h2) = sizes
    assert max(w1, h1) == max(w2, h2) == size
    assert abs(h1 - w1 / 3) <= 1 and abs(w2 - h2 / 3) <= 1  # 3:1 and 1:3 within a pixel


def test_dino_sees_whole_undistorted_crops():
    wide = Image.new("RGB", (90, 30), (200, 10, 10))
    padded = np.asarray(square(wide))
    assert padded.shape == (90, 90, 3)
    covered = (padded == (200, 10, 10)).all(axis=2)
    rows, cols = np.nonzero(covered)
    assert covered.sum() == 90 * 30 and cols.min() == 0 and cols.max() == 89 and rows.max() - rows.min() + 1 == 30


# --- 2. legible tags and pixel boxes in the annotate prompt


def ink_rows(tag: np.ndarray, fill) -> int:
    """Rows of a tag crop holding text pixels (any pixel far from the tag's fill colour)."""
    far = np.abs(tag.astype(int) - np.array(fill)).sum(axis=2) > 200
    ys = np.nonzero(far.any(axis=1))[0]
    return int(ys.max() - ys.min() + 1) if len(ys) else 0


@pytest.mark.parametrize("label,number", [("<s1>", 0), ("<s7>", 6), ("<s12>", 11)])
def test_tags_are_at_least_three_percent_of_the_image_height_on_a_filled_box(label, number):
    height = 1024
    image = Image.new("RGB", (1024, height), (0, 0, 0))
    boxes = [[0.05 * k, 0.5, 0.05 * k + 0.04, 0.6] for k in range(number)] + [[0.4, 0.3, 0.9, 0.9]]
    drawn = np.asarray(draw_labelled_boxes(image, boxes, [f"<s{k + 1}>" for k in range(number)] + [label]))
    fill = TAG_COLOURS[number]
    # The tag is the filled rectangle of its colour just above its box's top-left corner (x = 0.4 * 1024).
    column = drawn[:, 410]
    tag_rows = np.nonzero((column == fill).all(axis=1))[0]
    tag_rows = tag_rows[tag_rows < 0.3 * height]
    top, bottom = tag_rows.min(), tag_rows.max() + 1
    tag_cols = np.nonzero((drawn[top] == fill).all(axis=1))[0]
    tag = drawn[top:bottom, tag_cols.min():tag_cols.max() + 1]
    text_height = ink_rows(tag, fill)
    print(f"{label} on a {height} px image: tag {tag.shape[1]}x{tag.shape[0]} px, text {text_height} px")
    assert text_height >= TAG_HEIGHT * height  # >= 31 px on 1024: above one 28 px Qwen2.5-VL patch
    assert (np.abs(tag.astype(int) - fill).sum(axis=2) == 0).mean() > 0.5  # a filled background


def test_annotate_prompt_gives_each_box_in_pixels_beside_its_tag():
    subjects = [{"id": 1, "category": "dog", "box": [0.1, 0.2, 0.5, 0.9]}, {"id": 2, "category": "cutting board", "box": [0.5, 0.5, 1.0, 1.0]}]
    text = annotate.prompt(subjects, 1024, 768, annotate.annotation_schema(300, 6))
    assert "(1024x768 pixels)" in text
    assert "<s1> dog [102, 153, 512, 692]" in text and "<s2> cutting board [512, 384, 1024, 768]" in text


# --- 3. token budgets that hold the largest valid answer


def maximal(node: dict, defs: dict, fill: str) -> object:
    """The longest JSON value of a schema node: every string at its longest, made of `fill` repeated,
    every list at its most items, integers at their widest bound."""
    if "$ref" in node:
        return maximal(defs[node["$ref"].rsplit("/", 1)[-1]], defs, fill)
    kind = node["type"]
    if kind == "object":
        return {name: maximal(value, defs, fill) for name, value in node["properties"].items()}
    if kind == "array":
        return [maximal(node["items"], defs, fill) for _ in range(node["maxItems"])]
    if kind == "string":
        longest = int(node["pattern"].rsplit(",", 1)[1].split("}")[0]) + 1  # bounded_text's {min-1,max-1}
        return (fill * longest)[:longest]
    if kind == "integer":
        return max(node["minimum"], node["maximum"], key=lambda v: len(str(v)))
    if kind == "boolean":
        return False
    raise AssertionError(kind)


ENGLISH = "The red cutting board leans on the left of <s3>, under the lamp, beside the wooden table. "


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    from music_model.roles.base import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("zoo:qwen2_5_vl"))


def schemas():
    paper = parse_build_spec(yaml.safe_load(shipped("music_10k.yaml").read_text()))
    return {
        "annotate (paper: 300 chars, 6 relations, 12 subjects)": annotate.annotation_schema(paper.annotate.max_instruction_chars,
                                                                                            paper.annotate.max_relations),
        "compose (paper: 240 chars)": compose.composition_schema(paper.compose.max_caption_chars),
    }


@pytest.mark.parametrize("name", list(schemas()))
def test_the_budget_holds_the_largest_valid_answer(name, qwen_tokenizer):
    schema = schemas()[name]
    budget = schema_token_budget(schema)
    raw = schema.model_json_schema()
    for fill in (ENGLISH, "é", "😀"):  # ordinary text, then 2- and 4-byte characters
        value = maximal(raw, raw.get("$defs", {}), fill)
        schema.model_validate(value)  # it is a valid answer
        text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
        tokens = len(qwen_tokenizer(text, add_special_tokens=False).input_ids)
        print(f"{name}: {fill[:8]!r} answer of {len(text)} chars = {tokens} tokens; budget {budget}")
        assert tokens + 1 <= budget  # + the end token
    assert budget == max_json_bytes(raw) + 1


def test_a_spec_value_raises_the_budget_but_never_truncates():
    schema = annotate.annotation_schema(300, 6)
    assert DecodeOptions(max_new_tokens=16).budget(schema) == schema_token_budget(schema)
    assert DecodeOptions(max_new_tokens=10**6).budget(schema) == 10**6
    from pydantic import BaseModel

    class Unbounded(BaseModel):
        text: str

    with pytest.raises(ValueError, match="text: a string without a length bound"):
        schema_token_budget(Unbounded)


def test_a_tiny_vlm_with_a_small_spec_budget_still_finishes_every_annotation(tmp_path):
    from music_model.roles import load_role

    spec = tiny_spec(tmp_path)
    vlm = load_role({**spec.roles["vlm"].model_dump(), "options": {"max_pixels": 50176, "max_new_tokens": 8, "max_attempts": 1}})
    schema = annotate.annotation_schema(80, 2)
    images = [[Image.new("RGB", (64, 64), (k * 40, 80, 120))] for k in range(2)]
    results = vlm.generate(images, ["Describe <s1>."] * 2, schema, [0, 1])
    # (A random model's text can still fail validation: it may emit byte tokens that decode to U+FFFD.)
    assert all(r.ok or "unfinished" not in r.error for r in results), [r.error for r in results]


# --- 4. explicit, recorded sampling


def test_sampling_settings_are_explicit_and_recorded():
    paper = parse_build_spec(yaml.safe_load(shipped("music_10k.yaml").read_text()))
    for role in ("llm", "vlm"):
        settings = decode_settings(paper.roles[role].options)
        assert {k: settings[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")} == \
            {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0}
        assert settings["max_new_tokens"] == "derived from each schema's bounds"
    with pytest.raises(ValueError, match="options.top_p"):
        DecodeOptions.from_options({"top_p": 1.5})


def test_truncation_matches_transformers_top_k_and_top_p_warpers():
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    from music_model.roles.structured import truncate

    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    scores[1, :30] = float("-inf")  # a grammar mask
    for top_k, top_p in ((20, None), (None, 0.8), (20, 0.8), (1, 0.8)):
        expected = scores.clone()
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p:
            expected = TopPLogitsWarper(top_p)(None, expected)
        assert torch.equal(torch.isinf(truncate(scores, top_k, top_p)), torch.isinf(expected)), (top_k, top_p)


@pytest.fixture(scope="module")
def checkpoint_with_sampling_defaults(tmp_path_factory):
    """The zoo Qwen3 saved with a generation_config that asks for a strong repetition penalty, a
    no-repeat n-gram rule and top-k 1, as real checkpoints ship such settings."""
    import shutil

    from music_model.roles.base import resolve_model_path

    folder = tmp_path_factory.mktemp("qwen3-penalised") / "model"
    shutil.copytree(resolve_model_path("zoo:qwen3"), folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(repetition_penalty=5.0, no_repeat_ngram_size=2, do_sample=True, top_k=1, temperature=0.1)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_a_checkpoints_generation_config_never_changes_what_is_sampled(checkpoint_with_sampling_defaults):
    from pydantic import BaseModel

    from music_model.roles import load_role
    from music_model.roles.structured import bounded_text

    class Caption(BaseModel):
        caption: bounded_text(60)

    prompts, seeds = ["Describe a kitchen.", "Describe a park.", "Name three objects."], [1, 2, 3]
    zoo = load_role({"role": "llm", "backend": "transformers", "model": "zoo:qwen3", "device": "cpu"})
    penalised = load_role({"role": "llm", "backend": "transformers", "model": str(checkpoint_with_sampling_defaults), "device": "cpu"})
    assert penalised.decoder.checkpoint_generation_config.repetition_penalty == 5.0  # kept for the record, not used
    assert [r.text for r in penalised.generate(prompts, Caption, seeds)] == [r.text for r in zoo.generate(prompts, Caption, seeds)]


def test_top_k_one_is_greedy():
    from pydantic import BaseModel

    from music_model.roles import load_role
    from music_model.roles.structured import bounded_text

    class Caption(BaseModel):
        caption: bounded_text(40)

    base = {"role": "llm", "backend": "transformers", "model": "zoo:qwen3", "device": "cpu"}
    greedy = load_role({**base, "options": {"temperature": 0}})
    top1 = load_role({**base, "options": {"top_k": 1}})
    sampled = load_role(base)
    prompts = ["Describe a kitchen.", "Describe a park."]
    assert [r.text for r in top1.generate(prompts, Caption, [1, 2])] == [r.text for r in greedy.generate(prompts, Caption, [7, 8])]
    assert [r.text for r in sampled.generate(prompts, Caption, [1, 2])] != [r.text for r in greedy.generate(prompts, Caption, [1, 2])]


# --- 5. curated category display names

KNOWN_TYPOS = ["moniter", "bakset", "ballon", "dinning", "extention", "measur ", "mushroon", "campel", "buttefly", "noddles",
               "teniis", "billards", "hamimelon", "hotair"]


def test_every_objects365_category_has_a_clean_display_name():
    categories = [line.strip() for line in shipped("data/objects365_categories.txt").read_text().splitlines() if line.strip()]
    with shipped("data/objects365_display_names.tsv").open(newline="") as table:
        rows = list(csv.DictReader(table, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert [r["original"] for r in rows] == categories and len(categories) == 365
    names = compose.display_names()
    for category in categories:
        name = compose.display_name(category)
        assert name == names[category] and name == name.strip() and name, category
        assert "/" not in name and "  " not in name, (category, name)
        assert not any(typo in name.lower() + " " for typo in KNOWN_TYPOS), (category, name)
    assert compose.display_name("Cutting/chopping Board") == "cutting board"
    assert compose.display_name("Moniter/TV") == "monitor" and compose.display_name("Tape Measur/ Ruler") == "tape measure"
    assert len(set(names.values())) == 365  # no two categories share a name
    assert compose.display_name("My Own Category") == "My Own Category"  # a custom file's names as written


def test_compose_names_subjects_by_their_display_names(tmp_path):
    spec = tiny_spec(tmp_path, num_source_images=4, shard_size=4)
    fp = fingerprint(compose.STAGE, spec, "test")
    run_shard(compose.STAGE, spec, 0, fp, None)
    display = set(compose.display_names().values())
    rows = read_rows(stage_dir(spec, "compose", fp) / "part-00000.parquet")
    assert rows and all(set(row["categories"]) <= display for row in rows)


# --- 6. decimation by box area, the layout computed afresh


def test_decimation_drops_the_smallest_box_and_lays_out_the_rest_afresh(tmp_path):
    spec = tiny_spec(tmp_path)
    size = 64
    # Subject 1: a large box (0.25) whose mask is small (0.016); subject 2: a small box (0.04) used
    # as it is; subject 3: a box overlapping both. By mask area subject 1 would go first; by box, 2.
    small_mask = np.zeros((size, size), bool)
    small_mask[4:12, 4:17] = True
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.45, 0.45, 0.65, 0.65], [0.3, 0.3, 1.0, 1.0]]
    masks = [small_mask, box_to_mask(np.array(boxes[1]), size, size), box_to_mask(np.array(boxes[2]), size, size)]
    regions = ["mask", "box", "box"]
    subjects = [{"id": i + 1, "category": f"thing{i + 1}", "box": boxes[i], "mask": rle.encode(masks[i]), "region": regions[i],
                 "area": float(masks[i].mean())} for i in range(3)]
    layout = layout_grid(np.stack(masks), [1, 2, 3]).tolist()
    cot = {"subjects": [{"id": i, "role": f"<s{i}> stands", "placement": "here"} for i in (1, 2, 3)], "relations": ["<s1> near <s3>"]}
    row = {"id": "q-0", "index": 0, "source_id": "q-0", "num_subjects": 3, "width": size, "height": size, "subjects": subjects,
           "instruction": "Show <s1>, <s2> and <s3>.", "cot": json.dumps(cot), "layout": layout}
    steps = decimate.process([row], StageContext(spec, decimate.STAGE, 0))
    assert [s["num_subjects"] for s in steps] == [3, 2]
    after = steps[1]
    assert [s["category"] for s in after["subjects"]] == ["thing1", "thing3"]  # the smallest box went, not the smallest mask
    fresh = layout_grid(np.stack([masks[0], masks[2]]), [1, 2]).tolist()
    blanked = [{1: 1, 3: 2}.get(cell, 0) for cell in layout]
    assert fresh != blanked  # this case tells the two apart
    assert after["layout"] == fresh
    assert after["instruction"] == "Show <s1>, thing2 and <s2>."


# --- 7. the renderer LoRA reloads at its trained strength


def test_a_renderer_adapter_with_alpha_unlike_its_rank_reloads_at_the_same_strength(tmp_path):
    from data_specs.train import load_train_spec, parse_train_spec
    from music_model.music.renderer import Renderer
    from music_model.music.training import RendererTrainer

    data = load_train_spec("train_tiny.yaml").model_dump()
    data |= {"dataset": str(tmp_path), "output_root": str(tmp_path / "runs"), "pipeline": None,
             "lora": {**data["lora"], "rank": 4, "alpha": 16}}
    spec = parse_train_spec(data)
    trainer = RendererTrainer(spec)
    transformer = trainer.pipeline.transformer.eval()
    generator = torch.Generator().manual_seed(0)
    for name, parameter in transformer.named_parameters():
        if "lora_" in name:  # a trained-like adapter (lora_B starts at zero)
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    trainer.save_adapter(tmp_path / "renderer")
    loaded = Renderer.load(spec.renderer, tmp_path / "renderer", fuse=False).editor.pipeline.transformer

    config = transformer.config
    inputs = {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([2.5]) if config.guidance_embeds else None,
        "return_dict": False,
    }
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        got = loaded(**inputs)[0]
        transformer.disable_adapters()
        base = transformer(**inputs)[0]
    print(f"adapter effect {float((expected - base).abs().max()):.4f}, reload difference {float((expected - got).abs().max()):.2e}")
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    assert torch.allclose(got, expected, atol=1e-5)
