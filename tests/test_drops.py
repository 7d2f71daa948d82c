"""Every drop reason of the training-set build, each forced on purpose: a stage rerun on the shared
tiny chain's shard (tests/conftest.py `chain`) with a threshold made for it, a model whose output is
forced through the grammar, or a bad input. Each test asserts the reason, the detail, and that the
row is in the stage's dropped table and not in its output.

A forced model is a zoo checkpoint with its transformer layers' output projections zeroed (the last
hidden state is then the last token's embedding) and an untied output layer that boosts, after each
listed token, the token to follow: a bigram model, real transformers weights, that writes exactly
what the test needs once the grammar has fixed the JSON around it."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from data_specs.schemas import DROPPED, WORK
from music_model.media.images import to_struct
from tasks.engine.build_paths import stage_dir
from tasks.engine.contract import fingerprint, read_rows, run_shard, write_table
from tasks.engine.markers import shard_name
from tasks.publishing import publish, releases
from tasks.stages import annotate, compose, detect, filter, parse_build_spec, rerender, verify


def variant(spec, tmp_path: Path, **sections):
    """The chain's spec writing under tmp_path, with sections (or roles) updated key by key."""
    data = spec.model_dump(mode="json") | {"output_root": str(tmp_path)}
    for section, values in sections.items():
        if section == "roles":
            data["roles"] = {name: data["roles"][name] | values.get(name, {}) for name in data["roles"]}
        else:
            data[section] = data[section] | values
    return parse_build_spec(data)


def rerun(module, spec, upstream_dir: Path | None) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """Run `module`'s stage on shard 0; its summary, kept rows by id and dropped-table rows by id."""
    fp = fingerprint(module.STAGE, spec, "drop-test")
    summary = run_shard(module.STAGE, spec, 0, fp, upstream_dir)
    folder = stage_dir(spec, module.STAGE.name, fp)
    kept = {r["id"]: r for r in read_rows(folder / "part-00000.parquet")}
    dropped = read_rows(folder / "part-00000.dropped.parquet")
    assert all(d["stage"] == module.STAGE.name for d in dropped)
    assert not kept.keys() & {d["id"] for d in dropped}, "a row both kept and dropped"
    return summary, kept, {d["id"]: d for d in dropped}


def forced_checkpoint(entry: str, follow: dict[str, str], target: Path, boost: float = 50.0) -> Path:
    """Zoo entry `entry` (qwen3 or qwen2_5_vl) rewritten so that after token text `a` it writes
    `follow[a]` wherever the grammar allows it (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    from music_model.zoo import ensure_entry

    source = ensure_entry(entry)
    vision = entry == "qwen2_5_vl"
    model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    text_model = model.model.language_model if vision else model.model

    def token(text: str) -> int:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, f"{text!r} is not one token"
        return ids[0]

    with torch.no_grad():
        for layer in text_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.get_input_embeddings().weight
        head = embed.clone()
        for before, after in follow.items():
            hidden = text_model.norm(embed[token(before)])
            head[token(after)] += boost * hidden / hidden.dot(hidden)
        for config in (model.config, getattr(model.config, "text_config", None)):
            if config is not None:
                config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(target)
    (AutoProcessor if vision else AutoTokenizer).from_pretrained(source).save_pretrained(target)
    return target


# --- compose -------------------------------------------------------------------------------------


def test_compose_drops_what_the_llm_judges_implausible(chain, tmp_path):
    spec, out = chain
    # {"plausible": false, "caption": "a"} for every combination
    llm = forced_checkpoint("qwen3", {":": " false", " ": "false", '"': "a", "a": '"'}, tmp_path / "llm-says-no")
    strict = variant(spec, tmp_path, compose={"require_plausible": True}, roles={"llm": {"model": str(llm)}})
    summary, kept, dropped = rerun(compose, strict, None)
    assert kept == {} and summary["dropped"] == {"implausible_combination": 6}
    for row in out["compose"][1]:  # the same sampled categories as the chain's (they do not depend on the LLM)
        assert dropped[row["id"]]["reason"] == "implausible_combination"
        assert dropped[row["id"]]["detail"] == ", ".join(row["categories"])

    lenient = variant(spec, tmp_path / "lenient", roles={"llm": {"model": str(llm)}})  # require_plausible: false
    _, kept, dropped = rerun(compose, lenient, None)
    assert dropped == {} and {r["caption"] for r in kept.values()} == {"a"}


def test_compose_answers_always_fit_so_no_sample_is_lost_as_llm_invalid_output(chain, tmp_path):
    """`llm_invalid_output` has no cause left in compose: the grammar fixes the JSON and the token
    budget (structured.schema_token_budget) fits the longest answer the schema admits, whatever
    `max_new_tokens` says, and the llm role rejects no prompt. A model forced to ramble is cut at the
    schema's bound, and every sample keeps its answer."""
    spec, out = chain
    llm = forced_checkpoint("qwen3", {'"': "a", "a": " a", " a": " a"}, tmp_path / "llm-rambles")  # "a a a..." for ever
    rambling = variant(spec, tmp_path, roles={"llm": {"model": str(llm), "options": {"max_new_tokens": 1, "max_attempts": 1}}})
    summary, kept, dropped = rerun(compose, rambling, None)
    assert dropped == {} and summary["dropped"] == {}
    # Cut at the bound, then ended at its last whole word (structured.end_at_word).
    for row in kept.values():
        assert re.fullmatch(r"a( a)+", row["caption"]) and len(row["caption"]) >= spec.compose.max_caption_chars - 3, row["caption"]
    assert [r["categories"] for r in kept.values()] == [r["categories"] for r in out["compose"][1]]


# --- detect, verify, rerender --------------------------------------------------------------------


def test_detect_drops_samples_with_too_few_boxes(chain, tmp_path):
    spec, out = chain
    detected = {r["id"]: len(r["subjects"]) for r in out["detect"][1]}
    need = max(detected.values())  # only the samples with the most subjects keep enough
    _, kept, dropped = rerun(detect, variant(spec, tmp_path, verify={"min_subjects": need}), out["synthesize"][3])
    assert kept and dropped
    for row in out["synthesize"][1]:
        if detected.get(row["id"], 0) >= need:
            assert len(kept[row["id"]]["subjects"]) == detected[row["id"]]
        else:
            assert dropped[row["id"]]["reason"] == "too_few_detected"
            found, total = map(int, re.match(r"(\d+) of (\d+) categories kept", dropped[row["id"]]["detail"]).groups())
            assert found == detected.get(row["id"], found) < need and total == len(row["categories"])


def test_verify_drops_samples_with_too_few_verified_subjects(chain, tmp_path):
    spec, out = chain
    passed = {r["id"]: len(r["subjects"]) for r in out["verify"][1]}
    for d in out["verify"][2]:  # samples the chain itself dropped at verify: "<n> of <m> subjects passed"
        passed[d["id"]] = int(d["detail"].split(" of ")[0])
    need = max(passed.values())
    _, kept, dropped = rerun(verify, variant(spec, tmp_path, verify={"min_subjects": need}), out["detect"][3])
    assert kept and dropped
    for row in out["detect"][1]:
        if passed[row["id"]] >= need:
            assert len(kept[row["id"]]["subjects"]) == passed[row["id"]]
        else:
            assert dropped[row["id"]]["reason"] == "too_few_verified"
            assert dropped[row["id"]]["detail"] == f"{passed[row['id']]} of {len(row['subjects'])} subjects passed"


def test_rerender_drops_samples_whose_references_all_lose_identity(chain, tmp_path):
    spec, out = chain
    highest = max(s["reference_dino"] for r in out["rerender"][1] for s in r["subjects"])
    bounds = {"min_dino": min(highest + 1e-3, 0.999), "max_dino": 1.0}  # above every reference's DINO similarity
    summary, kept, dropped = rerun(rerender, variant(spec, tmp_path, rerender=bounds), out["verify"][3])
    assert kept == {} and summary["dropped"] == {"too_few_references": len(out["verify"][1])}
    for row in out["verify"][1]:
        detail = dropped[row["id"]]["detail"]
        assert dropped[row["id"]]["reason"] == "too_few_references"
        assert all(s["category"] in detail for s in row["subjects"]) and "identity lost" in detail, detail


# --- annotate ------------------------------------------------------------------------------------


def test_annotate_drops_an_instruction_naming_an_unknown_subject(chain, tmp_path):
    spec, out = chain
    # {"instruction": "<s3>", "subjects": [], "relations": []} for every sample
    vlm = forced_checkpoint("qwen2_5_vl", {'"': "<", "<": "s", "s": "3", "3": ">", ">": '"', "[": "]"}, tmp_path / "vlm-s3")
    forced = variant(spec, tmp_path, roles={"vlm": {"model": str(vlm)}})
    first, *others = out["rerender"][1]  # a 2-subject sample beside the others, whatever the random verify kept
    rows = [{**first, "subjects": first["subjects"][:2], "num_subjects": 2}, *others]
    upstream = out["rerender"][3].parent / "crafted-two-subjects"  # in the chain's build: its rows' images are there
    write_table(rows, WORK, upstream / f"{shard_name(0)}.parquet")
    _, kept, dropped = rerun(annotate, forced, upstream)
    assert {len(r["subjects"]) for r in rows} & {2} and {len(r["subjects"]) for r in rows} - {2}, "needs 2- and 3+-subject samples"
    for row in rows:
        if len(row["subjects"]) < 3:  # <s3> is no subject of a 2-subject sample
            assert dropped[row["id"]]["reason"] == "unknown_subject_in_instruction"
            assert dropped[row["id"]]["detail"] == "<s3>"
        else:  # kept, the subjects the instruction leaves out appended by the repair rules
            instruction = kept[row["id"]]["instruction"]
            assert instruction.startswith("<s3> with <s1> (") and all(f"<s{s['id']}>" in instruction for s in row["subjects"])


def test_annotate_drops_a_target_the_vlm_cannot_read(chain, tmp_path):
    spec, out = chain
    rows = out["rerender"][1]
    bad = rows[0]["id"]
    # A 2 x 600 target: Qwen2.5-VL's processor rejects aspect ratios over 200, failing this row only.
    crafted = [{**r, "image": to_struct(Image.new("RGB", (2, 600)))} if r["id"] == bad else r for r in rows]
    upstream = out["rerender"][3].parent / "crafted-unreadable"  # in the chain's build: its rows' images are there
    write_table(crafted, WORK, upstream / f"{shard_name(0)}.parquet")
    _, kept, dropped = rerun(annotate, variant(spec, tmp_path), upstream)
    assert dropped[bad]["reason"] == "vlm_invalid_output" and "input rejected" in dropped[bad]["detail"], dropped[bad]
    assert "aspect ratio" in dropped[bad]["detail"]
    assert bad not in kept and len(kept) + len(dropped) == len(rows)
    assert all(d["reason"] != "vlm_invalid_output" for i, d in dropped.items() if i != bad)


# --- filter and publish --------------------------------------------------------------------------


def test_filter_drops_subject_counts_out_of_range(chain, tmp_path):
    spec, out = chain
    rows = out["decimate"][1]
    counts = sorted({r["num_subjects"] for r in rows})
    assert len(counts) >= 2
    low = counts[-1]  # only the largest count is in range
    _, kept, dropped = rerun(filter, variant(spec, tmp_path, filter={"min_subjects": low, "max_subjects": 12}), out["decimate"][3])
    assert kept and dropped
    for row in rows:
        if row["num_subjects"] >= low:
            assert row["id"] in kept
        else:
            assert dropped[row["id"]]["reason"] == "subject_count_out_of_range"
            assert dropped[row["id"]]["detail"] == str(row["num_subjects"])


def test_publish_drops_near_duplicates_and_samples_over_the_cap(chain, tmp_path):
    spec, out = chain
    rows = out["filter"][1]
    sources = sorted({r["source_id"] for r in rows})
    assert len(sources) >= 3
    # Crafted embeddings: each source its own axis, except the second, a copy of the first.
    axis = {s: np.eye(len(rows[0]["clip_embedding"]), dtype=np.float32)[k] for k, s in enumerate(sources)}
    axis[sources[1]] = axis[sources[0]]
    crafted = [{**r, "clip_embedding": axis[r["source_id"]].tolist()} for r in rows]
    filter_dir = out["filter"][3].parent / "crafted-embeddings"  # in the chain's build: its rows' images are there
    write_table(crafted, WORK, filter_dir / f"{shard_name(0)}.parquet")
    survivors = sorted(r["id"] for r in rows if r["source_id"] != sources[1])
    cap = len(survivors) - 2
    capped = variant(spec, tmp_path, filter={"near_duplicate_clip": 0.5}, publish={"max_samples": cap})
    summaries = [out[stage][0] for stage in out]
    stats = publish.publish(capped, filter_dir, 1, summaries, "drop-test")

    table = stage_dir(capped, "publish", "drop-test") / "dropped.parquet"
    assert pq.read_schema(table).equals(DROPPED, check_metadata=False)
    dropped = {d["id"]: d for d in read_rows(table)}
    duplicates = {r["id"] for r in rows if r["source_id"] == sources[1]}
    assert {i for i, d in dropped.items() if d["reason"] == "near_duplicate"} == duplicates
    for i in duplicates:
        assert dropped[i]["detail"] == f"CLIP cosine 1.0000 >= 0.5 to source {sources[0]}" and dropped[i]["stage"] == "publish"
    assert {i for i, d in dropped.items() if d["reason"] == "over_max_samples"} == set(survivors[cap:])
    assert dropped[survivors[-1]]["detail"] == f"sample {len(survivors)} of {len(survivors)} by id; max_samples {cap}"

    published = {i for p in (Path(capped.output_root) / capped.name / "dataset" / "data").glob("*.parquet")
                 for i in pq.read_table(p).column("id").to_pylist()}
    assert published == set(survivors[:cap]) and not published & dropped.keys()
    assert stats["funnel"][-1]["dropped"] == {"near_duplicate": len(duplicates), "over_max_samples": 2}


def test_a_source_exactly_at_the_near_duplicate_threshold_is_a_near_duplicate():
    """Publish drops a source whose CLIP cosine to an earlier kept one is at or above
    `filter.near_duplicate_clip`: exactly at it counts. The cosine 0.75 is exact in float32."""
    embeddings = {"s0": np.array([1.0, 0.0], np.float32), "s1": np.array([0.75, np.sqrt(1 - 0.75**2)], np.float32),
                  "s2": np.array([0.0, 1.0], np.float32)}
    assert float(embeddings["s0"] @ embeddings["s1"]) == 0.75
    assert publish.near_duplicate_sources(embeddings, 0.75) == {"s1": ("s0", 0.75)}
    assert publish.near_duplicate_sources(embeddings, float(np.nextafter(0.75, 1.0))) == {}


def test_publish_to_a_target_drops_the_samples_beyond_it(chain, tmp_path):
    spec, out = chain
    rows = sorted(out["filter"][1], key=lambda r: r["id"])
    assert len(rows) >= 2
    data = spec.model_dump(mode="json") | {"output_root": str(tmp_path), "target": {"samples": len(rows) - 1}}
    targeted = parse_build_spec(data)
    stats = publish.publish(targeted, out["filter"][3], 1, [out[stage][0] for stage in out], "target-test", [6])
    dropped = read_rows(stage_dir(targeted, "publish", "target-test") / "dropped.parquet")
    assert [(d["id"], d["reason"]) for d in dropped] == [(rows[-1]["id"], "over_target")]
    assert dropped[0]["detail"] == f"beyond target.samples {len(rows) - 1}"
    assert stats["samples"] == len(rows) - 1 and stats["target"]["waves"] == [6]
    # Publishing the same build again (publish asks no "already published?": the flows' publish_once
    # does) makes no new release and leaves the published bytes as they were.
    dataset = Path(targeted.output_root) / targeted.name / "dataset"
    files = {p.relative_to(dataset): p.read_bytes() for p in sorted(dataset.rglob("*")) if p.is_file()}
    again = publish.publish(targeted, out["filter"][3], 1, [out[stage][0] for stage in out], "target-test", [6])
    assert [r["version"] for r in releases.releases(dataset)] == ["v1"] and again["release"] == stats["release"]
    assert {p.relative_to(dataset): p.read_bytes() for p in sorted(dataset.rglob("*")) if p.is_file()} == files


def test_every_drop_reason_of_the_stages_is_tested():
    """A new `ctx.drop(row, "<reason>", ...)` in tasks/ needs its test here (llm_invalid_output: the
    test that shows it has no cause left)."""
    tested = re.findall(r'["`](\w+)["`]', Path(__file__).read_text())
    found = set()
    for path in Path(__file__).resolve().parent.parent.joinpath("tasks").rglob("*.py"):
        found |= set(re.findall(r'(?:ctx\.drop\(\w+, |dropped_row\(\w+, (?:\w+|"[\w-]+"), )"(\w+)"', path.read_text()))
    assert found >= {"too_few_detected", "near_duplicate", "over_max_samples"}, found
    assert found <= set(tested), found - set(tested)
