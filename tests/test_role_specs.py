"""Bad role specs fail before anything loads, with one line naming the field."""
import pytest

from data_specs.roles import SpecError, parse_role_spec

GOOD = {"role": "clip", "backend": "transformers", "model": "openai/clip-vit-base-patch32"}


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"backend": "onnx"}, "backend", "cannot serve role 'clip'"),
        ({"role": "t2i"}, "backend", "cannot serve role 't2i'; use one of diffusers"),
        ({"model": "/no/such/checkpoint"}, "model", "local path does not exist: /no/such/checkpoint"),
        ({"model": "./missing-folder"}, "model", "local path does not exist"),
        ({"model": "zoo:bad name"}, "model", "zoo:<name>"),
        ({"dtype": "float8"}, "dtype", "'auto', 'float32', 'bfloat16' or 'float16'"),
        ({"batch_size": -1}, "batch_size", "must be a positive integer, got -1"),
        ({"batch_size": 0}, "batch_size", "got 0"),
        ({"device": "gpu"}, "device", "got 'gpu'"),
        ({"role": "painter"}, "role", "'llm'"),
        ({"temperature": 0.3}, "temperature", "Extra inputs are not permitted"),
    ],
)
def test_bad_spec_names_the_field(change, field, words):
    with pytest.raises(SpecError) as caught:
        parse_role_spec({**GOOD, **change}, where="roles.clip")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"roles.clip.{field}: "), message
    assert words in message


def test_good_specs_parse_without_loading_anything():
    spec = parse_role_spec({**GOOD, "batch_size": 8, "options": {"x": 1}})
    assert spec.batch_size == 8 and spec.dtype == "auto" and spec.device == "auto"
    assert parse_role_spec({"role": "segmenter", "backend": "segment_anything", "model": "zoo:sam_official"})


def test_existing_local_path_is_accepted(tmp_path):
    spec = parse_role_spec({**GOOD, "model": str(tmp_path)})
    assert spec.model == str(tmp_path)
