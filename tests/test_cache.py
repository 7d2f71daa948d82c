"""The process cache loads a model once per role spec, however often it is asked for."""
from concurrent.futures import ThreadPoolExecutor

from music_model.roles import clear_cache, load_role, model_loads, total_model_loads

DINO = {"role": "dino", "backend": "transformers", "model": "zoo:dino_vits16", "device": "cpu", "batch_size": 2}


def test_one_load_per_spec_across_calls_and_threads():
    clear_cache()
    first = load_role(DINO)
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda _: load_role(dict(DINO)), range(8)))
    assert all(role is first for role in again)
    assert total_model_loads() == 1

    other = load_role({**DINO, "batch_size": 4})  # another spec is another cache entry
    assert other is not first
    assert sorted(model_loads().values()) == [1, 1]
    clear_cache()
    assert total_model_loads() == 0
