"""The process cache loads a model once per role spec, however often it is asked for."""
import threading
from concurrent.futures import ThreadPoolExecutor

from music_model.roles import clear_cache, load_role, model_loads, total_model_loads

DINO = {"role": "dino", "backend": "transformers", "model": "zoo:dino_vits16", "device": "cpu", "batch_size": 2}


def test_threads_racing_a_first_load_load_once():
    clear_cache()
    start = threading.Barrier(8)

    def first_load(_):
        start.wait()  # all 8 threads ask for the model at once, before anyone has loaded it
        return load_role(dict(DINO))

    with ThreadPoolExecutor(8) as pool:
        roles = list(pool.map(first_load, range(8)))
    assert all(role is roles[0] for role in roles)
    assert total_model_loads() == 1
    assert load_role(DINO) is roles[0] and total_model_loads() == 1  # later calls hit the cache

    other = load_role({**DINO, "batch_size": 4})  # another spec is another cache entry
    assert other is not roles[0]
    assert sorted(model_loads().values()) == [1, 1]
    clear_cache()
    assert total_model_loads() == 0
