"""Prompts and parsing for real models: every prompt states its answer's JSON fields and bounds
(from the schema), texts cut at their bound end at a whole word with no cut `<sN` tag, a caption
must name every category, verify decides by p(yes) of one forward pass, and annotate gives boxes
in the frame the VLM sees. Real zoo models throughout (a forced bigram zoo LLM where a test needs
a known caption: tests/test_drops.py `forced_checkpoint`)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import yaml
from PIL import Image

from data_specs import shipped
from music_model.media.images import from_struct, to_struct
from music_model.roles import load_role
from music_model.roles.structured import bounded_int, bounded_list, bounded_text, describe_schema, end_at_word
from music_model.subjects import nouns
from tasks.engine.build_paths import stage_dir
from tasks.engine.contract import StageContext, fingerprint, read_rows, run_shard
from tasks.stages import annotate, compose, parse_build_spec, verify

TWELVE = ["cutting board", "tape measure", "French horn", "computer mouse", "fire extinguisher", "baseball glove",
          "toothbrush", "wine glass", "potted plant", "hair dryer", "traffic cone", "monitor"]
OPEN_TAG = re.compile(r"<(s\d*)?$")


def tiny_spec(tmp_path, **sections):
    data = yaml.safe_load(shipped("tiny.yaml").read_text())
    data.update(name="prompts", num_source_images=2, shard_size=2, output_root=str(tmp_path))
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return parse_build_spec(data)


def assert_ends_at_word(cut: str, full: str) -> None:
    """`cut` is `full` ended at a whole word: a prefix of it that stops before a space or a
    separator (never inside a word), with no `<sN` tag left open."""
    assert full.startswith(cut), (cut, full)
    assert cut == full or cut == "" or not (full[len(cut)].isalnum() or full[len(cut)] in "<>'-"), (cut, full[len(cut):])
    assert not OPEN_TAG.search(cut) and all(m.endswith(">") for m in re.findall(r"<s\d*>?", cut)), cut


# --- 1. the prompts state the JSON fields and their bounds ------------------------------------------


def test_every_prompt_states_its_schema_fields_and_bounds():
    caption = compose.prompt(TWELVE[:3], compose.composition_schema(240))
    assert "cutting board, tape measure, French horn" in caption
    assert '- "plausible"' in caption and "true or false" in caption
    assert re.search(r'- "caption" \([^)]*\): text of at most 240 characters', caption)
    assert "at most 48 characters" in compose.prompt(TWELVE[:3], compose.composition_schema(48))  # follows the spec

    subjects = [{"id": 1, "category": "dog", "box": [0.1, 0.2, 0.5, 0.9]}]
    text = annotate.prompt(subjects, 980, 980, annotate.annotation_schema(300, 6))
    for line in ('- "instruction" (', "): text of at most 300 characters", '- "subjects" (', "a list of at most 12 items",
                 '  - "id" (', "an integer from 1 to 12", '  - "role" (', '  - "placement" (', "text of at most 80 characters",
                 '- "relations" (', "a list of at most 6 items, each text of at most 100 characters"):
        assert line in text, line
    assert text.index('"instruction"') < text.index('"subjects"') < text.index('"id"') < text.index('"relations"')


def test_describe_schema_reads_every_bound_kind():
    from pydantic import BaseModel, Field

    class Reply(BaseModel):
        ok: bool
        name: bounded_text(20, min_length=3)
        ids: bounded_list(bounded_int(1, 12), max_length=4, min_length=1) = Field(description="subject numbers")

    assert describe_schema(Reply).splitlines() == [
        "Answer with one JSON object with these fields, in this order:",
        '- "ok": true or false',
        '- "name": text of 3 to 20 characters',
        '- "ids" (subject numbers): a list of 1 to 4 items, each an integer from 1 to 12',
    ]


# --- 2. texts end at a word, tags are never cut ----------------------------------------------------


def twelve_subject_texts() -> tuple[str, str]:
    caption = ("A sunlit workshop table holds " + ", ".join(f"a {name}" for name in TWELVE[:-1])
               + f" and a glowing {TWELVE[-1]} under a warm hanging lamp.")
    instruction = ("Create the scene: " + ", ".join(f"<s{i}> resting on the left of <s{i + 1}>" for i in range(1, 12))
                   + ", all lit from the window.")
    return caption, instruction


@pytest.mark.parametrize("which", ["caption", "instruction"])
def test_a_text_at_its_bound_never_ends_mid_word_or_mid_tag(which):
    full = dict(zip(("caption", "instruction"), twelve_subject_texts()))[which]
    assert len(full) > 240
    cut_inside_a_word = 0
    for bound in range(16, len(full)):  # the grammar cut the text at `bound` characters
        at_bound = full[:bound]
        cut_inside_a_word += full[bound].isalnum() or full[bound] in "<>"
        ended = end_at_word(at_bound, bound)
        assert_ends_at_word(ended, full)
        assert ended and len(ended) > bound - 30  # only the cut word and its separators go
    assert cut_inside_a_word > 100  # the sweep did cut words and tags
    assert end_at_word("Place <s1> left of <s12", 23) == "Place <s1> left of"
    assert end_at_word("Place <s1> left of <s", 21) == "Place <s1> left of"
    assert end_at_word("a dog under a tabl", 18) == "a dog under a"
    assert end_at_word("a dog, a cat, a bird.", 21) == "a dog, a cat, a bird."  # ends at a word already
    assert end_at_word("a do", 48) == "a do"  # under the bound the model itself closed the text
    assert end_at_word("aaaaaaaa", 8) == ""


@pytest.fixture(scope="module")
def rambles_dog_cup(tmp_path_factory):
    """A zoo LLM forced to write "dog cup dog cup ..." until the grammar closes the text."""
    from test_drops import forced_checkpoint

    follow = {'"': "dog", "dog": " cup", " cup": " dog", " dog": " cup"}
    return forced_checkpoint("qwen3", follow, tmp_path_factory.mktemp("llm") / "rambles")


@pytest.mark.parametrize("model", ["zoo", "rambler"])
def test_the_zoo_llm_at_a_tiny_bound_ends_at_a_word(model, request):
    from pydantic import BaseModel

    class Note(BaseModel):
        text: bounded_text(13)  # "dog cup dog" + 2 characters: the rambler's next word is cut

    path = "zoo:qwen3" if model == "zoo" else str(request.getfixturevalue("rambles_dog_cup"))
    llm = load_role({"role": "llm", "backend": "transformers", "model": path, "batch_size": 8})
    results = llm.generate([f"Describe <s{i % 12 + 1}> beside <s{i % 5 + 1}> in a kitchen." for i in range(16)], Note,
                           list(range(16)))
    raw = [r.value.text for r in results if r.ok]
    at_bound = [t for t in raw if len(t) == 13]
    ended = [end_at_word(t, 13) for t in raw]
    print(f"{model}: {len(at_bound)} of {len(raw)} texts reached the 13-character bound, e.g. {at_bound[:3]} -> {ended[:3]}")
    assert len(at_bound) >= 5  # both ramble to the bound
    for text, end in zip(raw, ended):
        assert_ends_at_word(end, text)
        if len(text) == 13 and end == text:  # kept whole at the bound only when it ends a word itself
            assert text[-1] in ".!?,;:)]>", text
    if model == "rambler":
        assert all(text.startswith("dog cup dog") for text in raw) and set(ended) <= {"dog cup dog", "dog cup"}


def test_annotate_repair_ends_every_text_at_a_word():
    schema = annotate.annotation_schema(24, 2)
    role = "the main subject of the photo, seen from the side, in the bright afternoon light"
    relation = "<s1> leans on <s2> while the warm light of the late afternoon falls across the old table and both cast long shadows"
    assert len(role) == annotate.NOTE_CHARS and relation[annotate.RELATION_CHARS].isalpha()  # at the bound, mid-word
    answer = schema(instruction="Place <s1> right of <s12", subjects=[{"id": 1, "role": role, "placement": "left"}],
                    relations=[relation[:annotate.RELATION_CHARS], "<s2> glows"])
    subjects = [{"id": i, "category": name, "box": [0.1 * i, 0.1, 0.1 * i + 0.1, 0.5]} for i, name in ((1, "dog"), (2, "lamp"))]
    instruction, cot = annotate.repair(answer, subjects, 24)
    assert instruction == "Place <s1> right of with <s2> (lamp)"  # the cut <s12 went; the repair names <s2>
    assert cot["subjects"][0]["role"] == role.removesuffix(" light")  # a word at the bound may run on: it goes
    assert cot["subjects"][1] == {"id": 2, "role": "lamp", "placement": annotate.placement_words(subjects[1]["box"])}
    assert_ends_at_word(cot["relations"][0], relation)
    assert cot["relations"][1] == "<s2> glows"  # under its bound: as written


# --- 3. a caption names every category -----------------------------------------------------------


def test_category_matching_is_case_insensitive_and_allows_plurals():
    caption = "Two Dogs and some Boxes near a cutting board, beside the Glasses."
    assert compose.missing_categories(caption, ["dog", "box", "Cutting Board", "glass", "cat", "board game", "do"]) == \
        ["cat", "board game", "do"]


def test_categories_are_matched_as_english_nouns_with_irregular_plurals():
    caption = "Strawberries and cherries beside two knives; people watch butterflies land on a cookie and a sneaker."
    names = ["strawberry", "cherry", "knife", "person", "butterfly", "cookies", "sneakers"]
    assert compose.missing_categories(caption, names) == []
    assert compose.missing_categories("A bus and some asparagus; two geese, three mice.", ["bus", "asparagus", "goose", "mouse"]) == []
    # A word is not its prefix, and a name's singular is not a shorter word ("bus" is not "bu").
    assert compose.missing_categories("A busy street with cherrypicked fruit and a bu.", ["bus", "cherry"]) == ["bus", "cherry"]
    assert nouns.with_article("sneakers") == "a sneaker" and nouns.with_article("cookies") == "a cookie"
    assert nouns.with_article("apple") == "an apple" and nouns.with_article("glasses") == "a pair of glasses"
    assert nouns.with_article("bus") == "a bus" and nouns.singular("leather shoes") == "leather shoe"
    assert "hold a sneaker?" in verify.prompt("sneakers") and 'labelled it "sneakers"' in verify.prompt("sneakers")


# Every plural display name of the 365, one of it as a sentence says it (checked by hand).
PLURAL_DISPLAY_NAMES = {
    "binoculars": "a pair of binoculars", "boots": "a boot", "chopsticks": "a chopstick", "cookies": "a cookie",
    "cosmetics": "a cosmetic", "earphones": "an earphone", "french fries": "a french fry", "glasses": "a pair of glasses",
    "gloves": "a glove", "grapes": "a grape", "green beans": "a green bean", "green vegetables": "a green vegetable",
    "headphones": "a pair of headphones", "high heels": "a high heel", "leather shoes": "a leather shoe", "noodles": "a noodle",
    "nuts": "a nut", "pliers": "a pair of pliers", "potato chips": "a potato chip", "sandals": "a sandal",
    "scissors": "a pair of scissors", "shoes": "a shoe", "skates": "a skate", "skis": "a ski", "slippers": "a slipper",
    "sneakers": "a sneaker", "spring rolls": "a spring roll", "toiletries": "a toiletry", "tongs": "a pair of tongs",
}


def test_the_objects365_display_names_read_as_english_in_both_numbers():
    """The plural names give one of them in a sentence; every 7th name is found in a sentence with
    its singular and in one with each of its plurals."""
    names = sorted(set(compose.display_names().values()))
    assert {n: nouns.with_article(n) for n in names if nouns.singular(n) != n} == PLURAL_DISPLAY_NAMES
    sample = names[::7]
    assert len(sample) == 53
    for name in sample:
        one = nouns.with_article(name)
        assert not compose.missing_categories(f"There is {one} on the table.", [name]), one
        for form in nouns.forms(name):
            assert not compose.missing_categories(f"Three {form} lie here.", [name]), (name, form)
        assert compose.missing_categories(f"There is {one}x here.", [name]) == [name]  # whole words only


@pytest.fixture(scope="module")
def says_dog_cup(tmp_path_factory):
    """A zoo LLM forced to caption everything "dog cup" (plausible or not: the tiny spec does not ask)."""
    from test_drops import forced_checkpoint

    return forced_checkpoint("qwen3", {'"': "dog", "dog": " cup", " cup": '"'}, tmp_path_factory.mktemp("llm") / "dog-cup")


@pytest.mark.parametrize("names,named", [("dog\ncup\n", True), ("dog\nbed\n", False)])
def test_a_caption_missing_a_category_is_retried_then_dropped(tmp_path, monkeypatch, says_dog_cup, names, named):
    from music_model.roles.llm import TransformersLLM

    calls = []
    generate = TransformersLLM.generate

    def counted(self, prompts, schema, seeds, system=None):
        calls.append(list(seeds))
        return generate(self, prompts, schema, seeds, system)

    monkeypatch.setattr(TransformersLLM, "generate", counted)
    (tmp_path / "names.txt").write_text(names)
    data = yaml.safe_load(shipped("tiny.yaml").read_text())
    data.update(name="named", num_source_images=2, shard_size=2, output_root=str(tmp_path), categories=str(tmp_path / "names.txt"),
                subject_counts={2: 1}, compose={**data["compose"], "require_named": True, "caption_attempts": 3})
    data["roles"]["llm"]["model"] = str(says_dog_cup)
    spec = parse_build_spec(data)
    fp = fingerprint(compose.STAGE, spec, "test")
    summary = run_shard(compose.STAGE, spec, 0, fp, None)
    folder = stage_dir(spec, "compose", fp)
    kept, dropped = read_rows(folder / "part-00000.parquet"), read_rows(folder / "part-00000.dropped.parquet")
    if named:
        assert [r["caption"] for r in kept] == ["dog cup", "dog cup"] and dropped == [] and len(calls) == 1
    else:
        assert kept == [] and summary["dropped"] == {"caption_misses_category": 2}
        assert all(d["detail"] == "bed not in: dog cup" for d in dropped)
        assert len(calls) == 3 and len({seed for seeds in calls for seed in seeds}) == 6  # each retry a new seed


def test_the_tiny_spec_turns_the_category_check_off():
    tiny = parse_build_spec(yaml.safe_load(shipped("tiny.yaml").read_text()))
    paper = parse_build_spec(yaml.safe_load(shipped("music_10k.yaml").read_text()))
    assert not tiny.compose.require_named and paper.compose.require_named and paper.compose.caption_attempts == 3


# --- 4. verify: p(yes) of one forward pass against a threshold ------------------------------------


@pytest.fixture(scope="module")
def vlm():
    """The tiny spec's VLM (its max_pixels: 50176), the one its stages load."""
    return load_role(yaml.safe_load(shipped("tiny.yaml").read_text())["roles"]["vlm"] | {"role": "vlm"})


@pytest.fixture(scope="module")
def rows(dreambench_dir) -> list[dict]:
    photos = [Image.open(path).convert("RGB").resize((256, 256)) for path in sorted(dreambench_dir.glob("*/00.jpg"))[:2]]
    boxes = [[0.1, 0.1, 0.6, 0.7], [0.4, 0.3, 0.95, 0.9], [0.0, 0.5, 0.5, 1.0]]
    categories = ["dog", "backpack", "cutting board"]
    return [{"id": f"v-{n}", "index": n, "image": to_struct(photo), "width": 256, "height": 256, "num_subjects": 3,
             "subjects": [{"id": i + 1, "category": c, "box": b} for i, (c, b) in enumerate(zip(categories, boxes))]}
            for n, photo in enumerate(photos)]


def subject_jobs(rows, margin):
    """Verify's crops and prompts for every subject of `rows`, in order."""
    crops, prompts = [], []
    for row in rows:
        image = from_struct(row["image"])
        for s in row["subjects"]:
            crops.append([verify.outlined_crop(image, s["box"], margin)])
            prompts.append(verify.prompt(s["category"]))
    return crops, prompts


def test_yes_probability_is_a_deterministic_batch_independent_probability(vlm, rows):
    crops, prompts = subject_jobs(rows, 0.1)
    batched = vlm.yes_probability(crops[:4], prompts[:4])
    again = vlm.yes_probability(crops[:4], prompts[:4])
    alone = np.array([vlm.yes_probability([c], [p])[0] for c, p in zip(crops[:4], prompts[:4])])
    print(f"p(yes) {np.round(batched, 4)}; alone vs batch of 4: max difference {np.abs(alone - batched).max():.2e}")
    assert batched.shape == (4,) and ((0 <= batched) & (batched <= 1)).all()
    assert np.array_equal(batched, again)  # no sampling: the same crop gets the same value
    assert np.abs(alone - batched).max() <= 1e-5
    assert len(set(np.round(batched, 6))) > 1  # it reads the input
    assert "Is the box and its label correct" in prompts[0] and "Answer Yes or No" in prompts[0]
    sliver = Image.new("RGB", (3000, 10))  # an aspect ratio the processor rejects: that sample alone is NaN
    mixed = vlm.yes_probability([[sliver], crops[0]], ["Is it a dog? Answer Yes or No.", prompts[0]])
    assert np.isnan(mixed[0]) and abs(mixed[1] - batched[0]) <= 1e-5


def test_verify_keeps_the_subjects_at_or_above_min_confidence(tmp_path, vlm, rows):
    crops, prompts = subject_jobs(rows, 0.1)
    p = vlm.yes_probability(crops, prompts)
    ordered = np.sort(p)
    middle = len(p) // 2
    assert ordered[middle] - ordered[middle - 1] > 1e-4, ordered  # a threshold between two values, clear of both
    threshold = float((ordered[middle] + ordered[middle - 1]) / 2)

    scores = []

    def run(**params):
        spec = tiny_spec(tmp_path, verify={"min_subjects": 1, "crop_margin": 0.1, **params})
        ctx = StageContext(spec, verify.STAGE, 0)
        kept = verify.process(rows, ctx)
        scores[:] = ctx.scores
        return kept, ctx.drops

    kept, drops = run(min_confidence=threshold)
    # The scores table holds every candidate, kept or not.
    assert [(r["index"], r["subject"]) for r in scores] == [(row["index"], s["id"]) for row in rows for s in row["subjects"]]
    assert [r["passed"] for r in scores] == [bool(v >= threshold) for v in p] and np.allclose([r["value"] for r in scores], p, atol=1e-5)
    confidences = p.reshape(len(rows), -1)
    for row, row_p in zip(rows, confidences):
        expected = [s["category"] for s, value in zip(row["subjects"], row_p) if value >= threshold]
        out = next((k for k in kept if k["id"] == row["id"]), None)
        if not expected:
            assert out is None and any(d.row["id"] == row["id"] and d.reason == "too_few_verified" for d in drops)
            continue
        assert [s["category"] for s in out["subjects"]] == expected and out["num_subjects"] == len(expected)
        assert [s["id"] for s in out["subjects"]] == list(range(1, len(expected) + 1))  # renumbered
        assert np.allclose([s["verify_confidence"] for s in out["subjects"]], [v for v in row_p if v >= threshold], atol=1e-5)
        assert all(s["verify_confidence"] >= threshold for s in out["subjects"])
    assert sum(k["num_subjects"] for k in kept) == len(p) - middle  # the upper half

    # A threshold equal to a subject's p(yes), as verify computes it: "at or above" keeps it.
    at = sorted(r["value"] for r in scores)[middle]
    kept_at, _ = run(min_confidence=at)
    assert sorted(r["value"] for r in scores)[middle] == at  # the same forward pass, the same value
    confidences_kept = sorted(s["verify_confidence"] for k in kept_at for s in k["subjects"])
    assert confidences_kept[0] == at and len(confidences_kept) == len(p) - middle

    everything, _ = run(min_confidence=1.0, require_match=False)  # require_match off: every subject, with its score
    assert [len(k["subjects"]) for k in everything] == [3, 3]
    assert all(s["verify_confidence"] is not None for k in everything for s in k["subjects"])
    nothing, drops = run(min_confidence=1.0)
    assert nothing == [] and {d.reason for d in drops} == {"too_few_verified"}


# --- 5. annotate's boxes in the frame the VLM sees --------------------------------------------------


@pytest.mark.parametrize("size", [(1024, 1024), (640, 480), (300, 52), (97, 1000), (20, 20)])
def test_the_frame_is_the_size_the_processor_patches(vlm, size):
    image = Image.new("RGB", size, (90, 120, 30))
    batch = vlm.processor(text=[vlm.chat_text(1, "x")], images=[[image]], return_tensors="pt", **vlm.images_kwargs)
    _, grid_h, grid_w = batch["image_grid_thw"][0].tolist()
    patch = vlm.processor.image_processor.patch_size
    assert vlm.frame_size(*size) == (grid_w * patch, grid_h * patch)
    if size == (1024, 1024):
        assert vlm.frame_size(*size) == (224, 224)  # the tiny spec's max_pixels 50176 = 224²


def test_annotate_prompts_give_boxes_in_the_vlms_frame(tmp_path, monkeypatch, vlm):
    from music_model.roles.vlm import TransformersVLM

    prompts = []
    generate = TransformersVLM.generate

    def recorded(self, images, texts, schema, seeds, system=None):
        prompts.extend(texts)
        return generate(self, images, texts, schema, seeds, system)

    monkeypatch.setattr(TransformersVLM, "generate", recorded)
    spec = tiny_spec(tmp_path, annotate={"max_instruction_chars": 16, "max_relations": 0})
    row = {"id": "a-0", "index": 0, "image": to_struct(Image.new("RGB", (1024, 1024), (40, 40, 40))), "width": 1024, "height": 1024,
           "subjects": [{"id": 1, "category": "dog", "box": [0.1, 0.2, 0.5, 0.9]}, {"id": 2, "category": "lamp", "box": [0.5, 0.5, 1.0, 1.0]}]}
    annotate.process([row], StageContext(spec, annotate.STAGE, 0))
    [text] = prompts
    assert "(224x224 pixels)" in text and "<s1> dog [22, 44, 112, 202]; <s2> lamp [112, 112, 224, 224]" in text
    assert "text of at most 16 characters" in text
