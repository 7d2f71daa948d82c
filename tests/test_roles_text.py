"""The llm and vlm roles on the tiny Qwen3 / Qwen2.5-VL zoo entries: schema-valid objects from
random models, per-row seeds, retries and drop reasons, deterministic zoo builds."""
from __future__ import annotations

import json

import pytest
from PIL import Image
from pydantic import BaseModel, ValidationError, field_validator

from music_model.roles import load_role
from music_model.roles.structured import StructuredResult, bounded_int, bounded_list, bounded_text
from music_model.zoo import ensure_entry, file_hashes

MAX_NEW_TOKENS = 96
LLM_SPEC = {"role": "llm", "backend": "transformers", "model": "zoo:qwen3", "batch_size": 2,
            "options": {"max_new_tokens": MAX_NEW_TOKENS}}
VLM_SPEC = {"role": "vlm", "backend": "transformers", "model": "zoo:qwen2_5_vl", "batch_size": 2,
            # bounds the image tokens (a 1280 px DreamBench photo would be ~2000 tokens)
            "options": {"max_new_tokens": MAX_NEW_TOKENS, "max_pixels": 448 * 448}}


class Caption(BaseModel):
    has_people: bool
    caption: bounded_text(60)
    subject_ids: bounded_list(bounded_int(1, 12), max_length=4)


class Verdict(BaseModel):
    matches: bool
    reason: bounded_text(40)


class Refused(BaseModel):
    reason: bounded_text(20)

    @field_validator("reason")
    @classmethod
    def _reject(cls, value: str) -> str:
        raise ValueError("this schema accepts nothing")


@pytest.fixture(scope="module")
def llm():
    return load_role(LLM_SPEC)


@pytest.fixture(scope="module")
def vlm():
    return load_role(VLM_SPEC)


@pytest.fixture(scope="module")
def photos(dreambench_dir) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted(dreambench_dir.glob("*/00.jpg"))]


def _assert_valid(result: StructuredResult, schema: type[BaseModel]) -> None:
    assert result.ok, result.error
    assert isinstance(result.value, schema) and result.error is None
    # The text is the JSON of the object, fields in schema order.
    assert list(json.loads(result.text)) == list(schema.model_fields)
    assert schema.model_validate_json(result.text) == result.value


def test_llm_batch_of_two(llm):
    from music_model.roles.llm import TransformersLLM

    assert isinstance(llm, TransformersLLM)
    results = llm.generate(["A kitchen with a red kettle.", "A dog next to a wooden chair."], Caption, [1, 2])
    assert len(results) == 2 and all(isinstance(r, StructuredResult) for r in results)
    for result in results:
        _assert_valid(result, Caption)
        assert result.attempts >= 1


def test_llm_twenty_seeds_all_validate(llm):
    results = llm.generate([f"Describe scene number {i}." for i in range(20)], Caption, list(range(20)),
                           system="Answer in JSON.")
    assert sum(r.ok for r in results) == 20, [r.error for r in results if not r.ok]
    for result in results:
        _assert_valid(result, Caption)
        assert 1 <= len(result.value.caption) <= 60 and len(result.value.subject_ids) <= 4
        assert all(1 <= i <= 12 for i in result.value.subject_ids)
    # Different seeds sample different text.
    assert len({r.text for r in results}) > 10


def test_llm_seed_alone_or_batched(llm):
    prompts = ["A cat on a sofa.", "Two cups on a table."]
    batched = llm.generate(prompts, Caption, [11, 12])
    alone = llm.generate(prompts[1:], Caption, [12])
    again = llm.generate(prompts, Caption, [11, 12])
    assert alone[0].text == batched[1].text
    assert [r.text for r in again] == [r.text for r in batched]
    assert llm.generate(prompts[1:], Caption, [13])[0].text != batched[1].text


def test_retry_exhausts_attempts_and_reports_reason(llm):
    results = llm.generate(["Say anything.", "Say something else."], Refused, [3, 4])
    assert len(results) == 2
    for result in results:
        assert not result.ok and result.value is None
        assert result.attempts == llm.options.max_attempts == 3
        assert "this schema accepts nothing" in result.error
        # The text was schema-shaped JSON: only the validator refused it.
        assert list(json.loads(result.text)) == ["reason"]


def test_a_small_max_new_tokens_never_cuts_an_answer_but_cuts_a_bare_decode():
    short = load_role({**LLM_SPEC, "options": {"max_new_tokens": 4, "max_attempts": 1}})
    [result] = short.generate(["Describe a park."], Caption, [0])
    _assert_valid(result, Caption)  # generate decodes within the schema's own budget
    inputs = short.tokenizer([short.chat_text("Describe a park.")], return_tensors="pt", add_special_tokens=False)
    [(text, finished)] = short.decoder.decode(inputs, short.decoder.grammar(Caption), [0], short.options)
    assert not finished and len(short.tokenizer(text, add_special_tokens=False).input_ids) <= 4


def test_bad_options_and_schemas_are_programming_errors(llm):
    with pytest.raises(ValueError, match="options.max_tokens"):
        load_role({**LLM_SPEC, "options": {"max_tokens": 10}})
    with pytest.raises(ValueError, match="options.temperature"):
        load_role({**LLM_SPEC, "options": {"temperature": -1}})

    class Impossible(BaseModel):
        count: bounded_int(5, 1)

    with pytest.raises(ValueError, match="xgrammar cannot compile the JSON schema of Impossible"):
        llm.generate(["x"], Impossible, [0])
    with pytest.raises(ValueError, match="seeds"):
        llm.generate(["x", "y"], Caption, [0])


def test_bounded_text_rejects_control_characters_quotes_and_length():
    Text = bounded_text(5)

    class Model(BaseModel):
        text: Text

    assert Model(text="a b").text == "a b"
    for bad in ["", "abcdef", "a\x01", 'a"b', "a\\b", " ab", "a\nb"]:
        with pytest.raises(ValidationError):
            Model(text=bad)


def test_vlm_batch_of_two_with_several_images(vlm, photos):
    from music_model.roles.vlm import TransformersVLM

    assert isinstance(vlm, TransformersVLM)
    results = vlm.generate([[photos[0]], [photos[1], photos[2]]],
                           ["Is this a backpack?", "Do both images show the same subject?"], Verdict, [1, 2])
    assert len(results) == 2
    for result in results:
        _assert_valid(result, Verdict)


def test_vlm_twenty_seeds_all_validate(vlm, photos):
    images = [[photos[i % len(photos)]] for i in range(20)]
    results = vlm.generate(images, ["Does the image show the named subject?"] * 20, Verdict, list(range(20)))
    assert sum(r.ok for r in results) == 20, [r.error for r in results if not r.ok]
    for result in results:
        _assert_valid(result, Verdict)
        assert 1 <= len(result.value.reason) <= 40
    assert len({r.text for r in results}) > 10


def test_vlm_seed_alone_or_batched(vlm, photos):
    images = [[photos[3]], [photos[4], photos[5]]]
    prompts = ["Is it a dog?", "Same subject?"]
    batched = vlm.generate(images, prompts, Verdict, [21, 22])
    alone = vlm.generate(images[1:], prompts[1:], Verdict, [22])
    assert alone[0].text == batched[1].text
    assert [r.text for r in vlm.generate(images, prompts, Verdict, [21, 22])] == [r.text for r in batched]


def test_vlm_max_pixels_bounds_image_tokens(vlm, photos):
    large = max(photos, key=lambda image: image.width * image.height)
    assert large.width * large.height > 448 * 448
    text = vlm.chat_text(1, "Is it a dog?")
    bounded = vlm.processor(text=[text], images=[[large]], return_tensors="pt", **vlm.images_kwargs)
    unbounded = vlm.processor(text=[text], images=[[large]], return_tensors="pt")
    image_token = vlm.processor.image_token_id
    n_bounded = int((bounded["input_ids"] == image_token).sum())
    assert 0 < n_bounded <= 448 * 448 // (28 * 28)
    assert int((unbounded["input_ids"] == image_token).sum()) > n_bounded


def test_vlm_bad_image_fails_its_row_only(vlm, photos):
    sliver = Image.new("RGB", (3000, 10), "white")  # aspect ratio over the processor's limit of 200
    results = vlm.generate([[sliver], [photos[0]]], ["Is it a dog?", "Is it a dog?"], Verdict, [5, 6])
    assert not results[0].ok and results[0].attempts == 0 and "input rejected" in results[0].error
    _assert_valid(results[1], Verdict)
    with pytest.raises(ValueError, match="no image"):
        vlm.generate([[]], ["Is it a dog?"], Verdict, [0])


@pytest.mark.parametrize("name", ["qwen3", "qwen2_5_vl"])
def test_zoo_entry_is_deterministic_and_small(tmp_path, name):
    first = ensure_entry(name, tmp_path / "a")
    second = ensure_entry(name, tmp_path / "b")
    assert file_hashes(first) == file_hashes(second)
    assert sum(path.stat().st_size for path in first.rglob("*") if path.is_file()) < 2_000_000
    assert (first / "model.safetensors").exists() and not list(first.glob("*.bin"))


def test_a_chat_model_without_a_pad_token_still_generates_batches(tmp_path, zoo_root):
    """Llama-style chat checkpoints ship no pad token: the role pads with its end token instead of
    failing every row of every batch."""
    import json
    import shutil

    from music_model.zoo import ensure_entry

    folder = tmp_path / "no-pad"
    shutil.copytree(ensure_entry("qwen3"), folder)
    for name in ("tokenizer_config.json", "config.json", "generation_config.json"):
        data = json.loads((folder / name).read_text())
        data.pop("pad_token_id", None)
        if "pad_token" in data:
            data["pad_token"] = None
        (folder / name).write_text(json.dumps(data))
    llm = load_role({**LLM_SPEC, "model": str(folder)})
    results = llm.generate(["a cat", "a dog on a sofa"], Caption, seeds=[1, 2])
    assert all(r.ok for r in results), [r.error for r in results]
