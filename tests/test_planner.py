"""The plan text format (exact round trip, strict parsing, the repair-or-reject rules, the decoding
grammar), the planner on the tiny zoo VLM, and the renderer's layout canvas, prompt and pipeline."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from music_model.music.plan import (Plan, PlanBounds, PlanError, SubjectNote, canonical_text, format_plan, parse_plan,
                                    placement_point, plan_from_sample, plan_grammar, read_plan, repair_plan)
from music_model.music.planner import Planner

WORD = st.text(st.characters(blacklist_categories=("Cc", "Zs", "Zl", "Zp", "Cs"), blacklist_characters="|\x85\u1680"),
               min_size=1, max_size=8)
TEXT = st.lists(WORD, min_size=1, max_size=4).map(" ".join)


@st.composite
def plans(draw, grid: int = 8) -> Plan:
    n = draw(st.integers(1, 12))
    notes = tuple(SubjectNote(k, draw(TEXT), draw(TEXT)) for k in range(1, n + 1))
    relations = tuple(draw(st.lists(TEXT, max_size=3)))
    layout = draw(st.lists(st.integers(0, n), min_size=grid * grid, max_size=grid * grid))
    cells = draw(st.permutations(range(grid * grid)))
    for subject, cell in zip(range(1, n + 1), cells):  # every subject keeps at least one cell
        layout[cell] = subject
    return Plan(notes, relations, tuple(layout))


@given(plans())
@settings(max_examples=300, deadline=None)
def test_format_then_parse_is_the_identity(plan):
    text = format_plan(plan)
    assert parse_plan(text) == plan
    assert format_plan(parse_plan(text)) == text
    reading = read_plan(text, plan.n_subjects)
    assert reading.plan == plan and reading.repairs == [] and reading.error is None


@given(plans(), st.sampled_from(["trailing space", "double space", "blank line", "crlf", "tab"]), st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_parse_accepts_only_the_exact_format_and_read_repairs_spacing(plan, damage, data):
    text = format_plan(plan)
    lines = text.split("\n")
    line = data.draw(st.integers(0, len(lines) - 1))
    if damage == "trailing space":
        lines[line] += " "
    elif damage == "double space":
        lines[line] = lines[line].replace(" ", "  ", 1) if " " in lines[line] else lines[line] + "  "
    elif damage == "blank line":
        lines.insert(line + 1, "")
    elif damage == "tab":
        lines[line] = lines[line].replace(" ", "\t", 1) if " " in lines[line] else "\t" + lines[line]
    damaged = "\r\n".join(lines) if damage == "crlf" else "\n".join(lines)
    assert damaged != text
    with pytest.raises(PlanError):  # only the exact text format_plan writes parses
        parse_plan(damaged)
    reading = read_plan(damaged, plan.n_subjects)
    assert reading.ok, reading.error
    assert reading.plan == plan  # spacing damage is repaired back to the plan


@given(st.text(max_size=60))
def test_canonical_text_is_idempotent_and_single_line(text):
    canonical = canonical_text(text)
    assert canonical_text(canonical) == canonical
    assert "|" not in canonical and "\n" not in canonical and "  " not in canonical
    assert canonical == canonical.strip() and not any(c.isspace() and c != " " for c in canonical)


def layout_text(rows: list[list[int]]) -> str:
    return "\n".join(" ".join(str(v) for v in row) for row in rows)


def two_subjects(rows=None, cot="<s1> dog | top left\n<s2> cat | bottom right", relations="") -> str:
    rows = rows or [[1, 1] + [0] * 6] + [[0] * 8] * 6 + [[0] * 6 + [2, 2]]
    return f"Subjects:\n{cot}\nRelations:\n{relations}Layout:\n{layout_text(rows)}"


def test_unknown_subject_ids_in_the_layout_become_background():
    rows = [[1, 1, 7, 0, 0, 0, 0, 0]] + [[0] * 8] * 6 + [[0] * 6 + [2, 3]]
    reading = read_plan(two_subjects(rows), 2)
    assert reading.ok and reading.plan.layout[2] == 0 and reading.plan.layout[63] == 0
    assert reading.repairs[0] == "layout cells of unknown subjects [3, 7] set to background"


def test_a_subject_with_no_cell_gets_the_free_cell_nearest_its_placement():
    rows = [[1, 1] + [0] * 6] + [[0] * 8] * 7  # <s2> ("bottom right") has no cell
    reading = read_plan(two_subjects(rows), 2)
    assert reading.ok
    assert reading.plan.cells(2) == [54]  # the cell whose centre is nearest (5/6, 5/6), the bottom-right third's centre
    assert reading.repairs == ["<s2> had no layout cell: given cell 54 (row 6, column 6)"]
    assert placement_point("upper LEFT corner") == (1 / 6, 1 / 6) and placement_point("somewhere") == (0.5, 0.5)


def test_with_no_background_left_a_cell_is_taken_from_a_subject_that_keeps_another():
    layout = [1] * 64
    plan, repairs = repair_plan([(1, "dog", "left"), (2, "cat", "top right")], [], layout, 2)
    assert plan.cells(2) == [14] and len(plan.cells(1)) == 63  # row 1, column 6: the cell nearest (5/6, 1/6)
    assert repairs == ["<s2> had no layout cell: given cell 14 (row 1, column 6)"]


def test_layouts_of_the_wrong_size_are_rejected_with_the_reason():
    seven_rows = read_plan(two_subjects([[1, 2] + [0] * 6] * 7), 2)
    assert not seven_rows.ok and seven_rows.error == "the layout has 7 rows, expected 8"
    short_row = read_plan(two_subjects([[1, 2, 0]] + [[0] * 8] * 7), 2)
    assert not short_row.ok and short_row.error.startswith("layout row 1 is not 8 non-negative integers")
    no_layout = read_plan("Subjects:\n<s1> dog | left\nRelations:\n", 1)
    assert not no_layout.ok and no_layout.error == "no 'Layout:' line"
    with pytest.raises(PlanError, match="the layout has 7 rows, expected 8"):
        parse_plan(two_subjects([[1, 2] + [0] * 6] * 7))


def test_cot_lines_are_repaired_unknown_removed_missing_filled():
    reading = read_plan(two_subjects(cot="<s1> dog|top left\n<s5> ghost | nowhere\n<s1> again | x",
                                     relations="- <s1> chases <s2>\n- <s9> flies\n"), 2, categories=["dog", "cat"])
    assert reading.ok
    plan = reading.plan
    assert plan.subjects == (SubjectNote(1, "dog", "top left"), SubjectNote(2, "cat", "bottom right of the image"))
    assert plan.relations == ("<s1> chases <s2>",)
    assert set(reading.repairs) >= {"CoT entry for unknown subject <s5> removed", "second CoT entry for <s1> removed",
                                    "missing CoT entry for <s2> filled", "relation naming an unknown subject removed: '<s9> flies'"}


def test_strict_parse_rejects_bad_plans_with_reasons():
    with pytest.raises(PlanError, match="have no layout cell"):
        parse_plan(two_subjects([[1, 1] + [0] * 6] + [[0] * 8] * 7))
    with pytest.raises(PlanError, match="subject IDs must be 1..2 in order"):
        parse_plan(two_subjects(cot="<s2> cat | right\n<s1> dog | left"))
    with pytest.raises(PlanError, match="is not '<sN> ROLE | PLACEMENT'"):
        parse_plan(two_subjects(cot="<s1> dog\n<s2> cat | right"))


def test_a_published_sample_becomes_its_target_plan():
    cot = {"subjects": [{"id": 1, "role": "the  dog ", "placement": "left"}, {"id": 2, "role": "a|cat", "placement": ""}], "relations": ["<s1> near <s2>"]}
    layout = [1, 1] + [0] * 61 + [2]
    plan, repairs = plan_from_sample(cot, layout, 2, ["dog", "cat"])
    assert plan.subjects[0] == SubjectNote(1, "the dog", "left")
    assert plan.subjects[1] == SubjectNote(2, "a/cat", "bottom right of the image")
    assert repairs == ["CoT entry for <s1> made canonical", "CoT entry for <s2> made canonical"]
    assert parse_plan(format_plan(plan)) == plan


@pytest.fixture(scope="module")
def vlm(zoo_root):
    from data_specs.roles import parse_role_spec
    from music_model.roles import load_role

    return load_role(parse_role_spec({"role": "vlm", "backend": "transformers", "model": "zoo:qwen2_5_vl", "batch_size": 4,
                                      "options": {"max_pixels": 3136, "temperature": 0.7}}))


BOUNDS = PlanBounds(max_relations=1, max_field_words=2, max_word_chars=5)


@given(plans())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_decoding_grammar_accepts_exactly_the_format(vlm, plan):
    import xgrammar as xgr

    bounds = PlanBounds(max_relations=3, max_field_words=4, max_word_chars=8)
    grammar = vlm.decoder.compiler.compile_grammar(plan_grammar(plan.n_subjects, bounds))
    text = format_plan(plan)
    matcher = xgr.GrammarMatcher(grammar)
    assert matcher.accept_string(text) and matcher.is_completed()
    assert len(text.encode()) <= bounds.max_bytes(plan.n_subjects)
    assert not xgr.GrammarMatcher(grammar).accept_string(text.replace(" ", "  ", 1))


def test_the_token_budget_covers_the_longest_plan_of_four_byte_characters(vlm):
    """A token is at least one byte, not one character: the longest plan the grammar admits, every
    word of 4-byte characters, fits the budget (one token per character would cut it)."""
    import xgrammar as xgr

    bounds = PlanBounds(max_relations=2, max_field_words=3, max_word_chars=5)
    text_field = " ".join(["\U0001d538" * bounds.max_word_chars] * bounds.max_field_words)
    n = 12
    plan = Plan(tuple(SubjectNote(k, text_field, text_field) for k in range(1, n + 1)), (text_field,) * bounds.max_relations,
                tuple(range(1, n + 1)) + (10,) * (64 - n))  # two digits in every cell but subjects 1-9's own
    text = format_plan(plan)
    grammar = vlm.decoder.compiler.compile_grammar(plan_grammar(n, bounds))
    assert xgr.GrammarMatcher(grammar).accept_string(text)
    assert 2 * len(text) < len(text.encode()) <= bounds.max_bytes(n)


def test_the_planner_writes_valid_plans_from_each_seed(vlm):
    planner = Planner(vlm, BOUNDS)
    images = [[Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200))], [Image.new("RGB", (32, 32))] * 3]
    instructions = ["a photo of <s1> and <s2>", "<s1>, <s2> and <s3> on a table"]
    categories = [["dog", "cat"], ["cup", None, "book"]]
    first = planner.plan(images, instructions, categories, [11, 12])
    again = planner.plan(images[:1], instructions[:1], categories[:1], [11])
    for reading, n in zip(first, (2, 3)):
        assert reading.ok, reading.error
        assert reading.plan.n_subjects == n and reading.plan.grid == 8
        assert parse_plan(reading.text) is not None  # constrained decoding writes the exact format
        assert all(reading.plan.cells(s) for s in range(1, n + 1))
        assert all(r.startswith("<s") and "had no layout cell" in r for r in reading.repairs)  # the one repair possible
    assert first[0].seed == 11 and again[0].text == first[0].text  # a row's text depends on its seed only
    with pytest.raises(ValueError, match="one category"):
        planner.plan(images[:1], instructions[:1], [["dog"]], [1])


def test_layout_canvas_puts_each_reference_in_its_cells():
    from music_model.music.renderer import layout_canvas, render_prompt

    layout = [0] * 64
    for cell in (0, 1, 8, 9):
        layout[cell] = 1
    layout[63] = 2
    plan = Plan((SubjectNote(1, "sleeping", "top left"), SubjectNote(2, "<s1>'s toy", "bottom right")), ("<s2> next to <s1>",), tuple(layout))
    canvas = np.asarray(layout_canvas([Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (10, 20), (0, 0, 255))], plan, 64, 64))
    assert (canvas[0:16, 0:16] == [255, 0, 0]).all()  # <s1>: a 2x2-cell box, square reference fills it
    assert (canvas[56:64, 58:62] == [0, 0, 255]).all() and (canvas[56:64, 56:58] == 255).all()  # <s2>: aspect kept, centred
    assert (canvas[30:40, 30:40] == 255).all()  # background
    prompt = render_prompt("<s1> with <s2>", plan, ["dog", "ball"])
    assert prompt == "dog with ball. The dog: sleeping, top left. The ball: dog's toy, bottom right. ball next to dog."


def test_the_renderer_draws_from_canvases_deterministically(zoo_root):
    from data_specs.roles import parse_role_spec
    from music_model.music.renderer import Renderer

    renderer = Renderer.load(parse_role_spec({"role": "editor", "backend": "diffusers", "model": "zoo:flux_kontext", "batch_size": 2,
                                              "options": {"num_inference_steps": 2}}))
    plan = Plan((SubjectNote(1, "dog", "left"),), (), tuple([1] * 8 + [0] * 56))
    references = [[Image.new("RGB", (32, 32), (255, 0, 0))]] * 2
    images = renderer.render(references, [plan, plan], ["a <s1>"] * 2, [["dog"]] * 2, [1, 2], 64, 48)
    again = renderer.render(references[:1], [plan], ["a <s1>"], [["dog"]], [1], 64, 48)
    assert [im.size for im in images] == [(64, 48), (64, 48)]
    assert np.abs(np.asarray(images[0], float) - np.asarray(again[0], float)).max() <= 1
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    with pytest.raises(ValueError, match="multiples of 16"):
        renderer.render(references[:1], [plan], ["a <s1>"], [["dog"]], [1], 60, 48)
