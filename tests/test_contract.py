"""The stage contract, held by the engine without Prefect: a stage reads only the spec fields it
declares (and they alone are fingerprinted), writes only the columns it declares, and a shard is
reused only while its parts prove themselves; one build per output folder at a time."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from tasks.engine.build_lock import BuildLocked, build_lock, lock_holder
from tasks.engine.build_paths import stage_dir
from tasks.engine.contract import ContractError, Stage, declares, fingerprint, root_fingerprint, run_shard
from tasks.engine.markers import check_shard
from tasks.stages import STAGES, spec_model


def test_every_stage_reads_only_what_it_declares(chain):
    """Each shard's marker records the spec fields its stage read: all declared, none missed."""
    _, out = chain
    for stage in STAGES:
        reads = out[stage.name][0]["reads"]
        assert reads and all(declares(stage.reads, path) for path in reads), (stage.name, reads, stage.reads)
        # and each declared read is used (a stale declaration would rerun the stage for nothing)
        assert all(any(declares((read,), path) for path in reads) for read in stage.reads), (stage.name, reads)


def _shard_spec(spec, tmp_path, **sections):
    return spec.model_copy(update={"output_root": str(tmp_path), **sections})


def test_an_undeclared_read_role_or_column_fails_the_shard(chain, tmp_path):
    spec, out = chain
    spec = _shard_spec(spec, tmp_path)
    upstream = out["annotate"][3]
    layout = next(s for s in STAGES if s.name == "layout")

    def reads_verify(rows, ctx):
        ctx.spec.verify.min_subjects
        return rows

    def loads_llm(rows, ctx):
        ctx.role("llm")
        return rows

    def writes(column):
        return lambda rows, ctx: [{**r, column: "x"} for r in rows]

    cases = {
        "reads spec field 'verify'": dataclasses.replace(layout, process=reads_verify),
        "does not declare role 'llm'": dataclasses.replace(layout, process=loads_llm),
        "wrote columns ['caption_2']": dataclasses.replace(layout, process=writes("caption_2")),
        "wrote columns ['clip_embedding']": dataclasses.replace(layout, process=lambda rows, ctx: [{**r, "clip_embedding": [0.0]} for r in rows]),
    }
    for message, stage in cases.items():
        with pytest.raises(ContractError, match=message.replace("[", r"\[").replace("]", r"\]")):
            run_shard(stage, spec, 0, "contract", upstream)
        assert not list(stage_dir(spec, "layout", "contract").glob("*.done.json"))
    # A misspelled read fails when the stage joins the list: the spec model is the list's.
    STAGES.append(Stage("bad", 1, reads_verify, reads=("verify.min_subject",)))
    try:
        with pytest.raises(ContractError, match="'verify.min_subject' is not a field of the build spec"):
            spec_model()
    finally:
        STAGES.pop()
    with pytest.raises(ContractError, match="neither schemas.WORK nor its columns hold"):
        Stage("bad", 1, reads_verify, writes=("caption_2",))


def test_fingerprints_hash_what_a_stage_reads_and_its_roles_content(chain):
    spec, _ = chain

    def fingerprints(s) -> dict[str, str]:
        upstream, fps = root_fingerprint(s), {}
        for stage in STAGES:
            upstream = fps[stage.name] = fingerprint(stage, s, upstream)
        return fps

    base = fingerprints(spec)
    # min_subjects is read by detect (and verify and rerender): detect reruns, what comes before does not.
    changed = fingerprints(_shard_spec(spec, "x", verify=spec.verify.model_copy(update={"min_subjects": 3})))
    assert [s.name for s in STAGES if changed[s.name] != base[s.name]] == [s.name for s in STAGES][2:]
    # Execution settings change no fingerprint; a content setting of a role does.
    roles = dict(spec.roles)
    roles["t2i"] = roles["t2i"].model_copy(update={"batch_size": 1, "device": "cpu", "offload": "model"})
    roles["editor"] = roles["editor"].model_copy(update={"batch_size": 1})
    assert fingerprints(_shard_spec(spec, "x", roles=roles)) == base
    roles["t2i"] = roles["t2i"].model_copy(update={"dtype": "bfloat16"})
    assert [s.name for s in STAGES if fingerprints(_shard_spec(spec, "x", roles=roles))[s.name] != base[s.name]] == \
        [s.name for s in STAGES][1:]
    # Only publish reads the near-duplicate threshold: no stage reruns for it.
    assert fingerprints(_shard_spec(spec, "x", filter=spec.filter.model_copy(update={"near_duplicate_clip": 0.5}))) == base


def test_a_part_that_no_longer_proves_itself_is_redone(chain, tmp_path):
    """A truncated part fails its size; a part with bytes flipped in place fails its sha256 (checked
    with verify); either way the marker goes and the shard is done again, to the same rows."""
    import shutil

    spec, out = chain
    spec = _shard_spec(spec, tmp_path)
    summary, rows, _, folder = out["annotate"]
    copy = stage_dir(spec, "annotate", summary["fingerprint"])
    shutil.copytree(folder, copy)
    part = copy / "part-00000.parquet"
    assert check_shard(spec, "annotate", summary["fingerprint"], 0, verify=True) == ({**summary, "skipped": True}, None)

    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    marker, problem = check_shard(spec, "annotate", summary["fingerprint"], 0)
    assert marker is None and f"part-00000.parquet is {len(data) // 2} bytes, its marker says {len(data)}" in problem
    assert not (copy / "part-00000.done.json").exists()

    flipped = bytearray(data)
    flipped[64] ^= 0xFF  # in the first column chunk, far from the footer
    part.write_bytes(bytes(flipped))
    shutil.copy(folder / "part-00000.done.json", copy / "part-00000.done.json")
    assert check_shard(spec, "annotate", summary["fingerprint"], 0)[0] is not None  # size and footer still hold
    marker, problem = check_shard(spec, "annotate", summary["fingerprint"], 0, verify=True)
    assert marker is None and "has another sha256 than its marker's" in problem

    annotate = next(s for s in STAGES if s.name == "annotate")
    redone = run_shard(annotate, spec, 0, summary["fingerprint"], out["rerender"][3])
    assert not redone["skipped"] and part.read_bytes() == data


def test_each_image_is_stored_once_and_a_damaged_one_redoes_its_shard(chain, tmp_path):
    """Targets and references live once in the build's image store, by content; stage rows, decimated
    siblings included, name them; a stored image cut short fails the marker of the shard that made it."""
    import shutil

    spec, out = chain
    images = {s["reference"]["path"] for r in out["filter"][1] for s in r["subjects"]} | {r["image"]["path"] for r in out["filter"][1]}
    assert all(path.startswith("images/") for path in images)
    assert all(r["image"]["bytes"] is None for stage in ("synthesize", "filter") for r in out[stage][1])
    # decimated siblings share their target's file: one target per source
    assert len({r["image"]["path"] for r in out["filter"][1]}) == len({r["source_id"] for r in out["filter"][1]})
    summary, _, _, folder = out["synthesize"]
    assert set(summary["images"]) == {r["image"]["path"] for r in out["synthesize"][1]}

    spec = _shard_spec(spec, tmp_path)
    shutil.copytree(folder, stage_dir(spec, "synthesize", summary["fingerprint"]))
    shutil.copytree(folder.parents[2] / "images", tmp_path / spec.name / "images")
    first = sorted(summary["images"])[0]
    stored = tmp_path / spec.name / first
    stored.write_bytes(stored.read_bytes()[:100])
    marker, problem = check_shard(spec, "synthesize", summary["fingerprint"], 0)
    assert marker is None and f"{first} is 100 bytes, its marker says {summary['images'][first]}" in problem


def test_one_build_per_folder_and_a_dead_holder_frees_it(chain, tmp_path):
    spec, _ = chain
    spec = _shard_spec(spec, tmp_path)
    assert lock_holder(spec) is None
    with build_lock(spec, {"what": "build", "flow_run": "first (1)"}):
        assert "flow_run first (1)" in lock_holder(spec)
        # The lock is per open file: a second holder in this process is refused as another process would be.
        with pytest.raises(BuildLocked, match="being built by another run .*flow_run first"):
            with build_lock(spec, {"what": "build", "flow_run": "second (2)"}):
                pass
        released = threading.Event()
        waited = {}

        def wait_for_it():
            started = time.monotonic()
            with build_lock(spec, {"what": "build", "flow_run": "third (3)"}, wait=True):
                waited["seconds"] = time.monotonic() - started
                released.wait(5)

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.5)
        assert "seconds" not in waited
    released.set()
    waiter.join(timeout=5)
    assert waited["seconds"] >= 0.4 and lock_holder(spec) is None


def test_a_shard_whose_source_range_grew_is_redone_and_so_are_the_shards_made_from_it(chain, tmp_path):
    """Fingerprints do not count sources: 6 sources in shards of 4, then 8, share one fingerprint;
    the last shard's range grew (4-6 to 4-8), so it is redone, and the synthesize shard made from its
    old part is redone too, while shard 0 is reused."""
    from tasks.engine.contract import shard_input
    from tasks.stages import stage_named

    spec, _ = chain
    six = _shard_spec(spec, tmp_path, num_source_images=6, shard_size=4)
    eight = _shard_spec(spec, tmp_path, num_source_images=8, shard_size=4)
    compose, synthesize = stage_named("compose"), stage_named("synthesize")
    assert root_fingerprint(six) == root_fingerprint(eight)
    compose_fp = fingerprint(compose, six, root_fingerprint(six))
    synthesize_fp = fingerprint(synthesize, six, compose_fp)
    composed = stage_dir(six, "compose", compose_fp)
    for shard in (0, 1):
        run_shard(compose, six, shard, compose_fp, None)
        run_shard(synthesize, six, shard, synthesize_fp, composed)

    assert check_shard(eight, "compose", compose_fp, 0, expected_input=shard_input(eight, 0, None))[0] is not None
    marker, problem = check_shard(eight, "compose", compose_fp, 1, expected_input=shard_input(eight, 1, None))
    assert marker is None and "its input changed (sources 4-6 -> sources 4-8)" in problem
    redone = run_shard(compose, eight, 1, compose_fp, None)
    assert not redone["skipped"] and redone["rows_in"] == 4 and redone["input"] == "sources 4-8"
    marker, problem = check_shard(eight, "synthesize", synthesize_fp, 1, expected_input=shard_input(eight, 1, composed))
    assert marker is None and "its input changed" in problem
    assert run_shard(synthesize, eight, 1, synthesize_fp, composed)["rows_in"] == 4
    assert run_shard(synthesize, eight, 0, synthesize_fp, composed)["skipped"]
