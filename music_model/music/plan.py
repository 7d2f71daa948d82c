"""The MUSIC plan: the vision chain of thought (CoT) + 8x8 layout the planner (`planner.py`) writes,
as one text: its format, its lenient reading with documented repairs, and its grammar.

The plan text format (what the planner is trained to write and what `format_plan` / `parse_plan`
serialise and parse; the two round-trip exactly)::

    Subjects:
    <s1> a brown dog | bottom left of the image
    <s2> a red ball | middle center of the image
    Relations:
    - <s1> looks at <s2>
    Layout:
    0 0 0 0 0 0 0 0
    ... (8 rows of 8 space-separated subject IDs, 0 = background)

- One `<sN> ROLE | PLACEMENT` line per subject, IDs 1..n in order; then zero or more `- RELATION`
  lines; then the grid, one row per line. Lines are joined by a single `\n`, with no trailing
  newline.
- ROLE, PLACEMENT and RELATION are *canonical texts*: no control characters, no `|`, whitespace
  runs collapsed to one space, no leading or trailing space, not empty (`canonical_text`).
- The layout holds only IDs 0..n and every subject has at least one cell.

`parse_plan` accepts exactly the texts `format_plan` writes (so `format_plan(parse_plan(t)) == t`
and `parse_plan(format_plan(p)) == p`) and raises `PlanError` naming the first problem.

`read_plan` reads a model's output leniently and repairs it by these rules, in order, recording
each repair; it rejects (PlanError with the reason) what it cannot repair:

1. Blank lines and spaces around lines are ignored; a missing `Subjects:`, `Relations:` or
   `Layout:` header, or headers out of order: rejected.
2. Layout size: not exactly `grid` rows of `grid` integers: rejected (a grid of another size has
   no position meaning we could recover).
3. Unknown subject ID in a cell (above n): the cell becomes background.
4. CoT lines: a line for an unknown ID, or a second line for an ID, is removed; a line with
   no `|` keeps its text as the role and gets a placement from its cells; texts are made canonical.
   A subject with no line gets its category (or `subject`) as role and a placement from its cells.
5. A relation naming an unknown subject (`<sK>`, K > n) is removed (as the annotate stage does).
6. A subject with no cell gets the free (background) cell nearest to the point its placement words
   name (`top`/`upper`, `bottom`/`lower`, `left`, `right`; otherwise the centre; ties: lowest
   cell index); with no background cell left, the nearest cell of a subject that keeps another
   cell; with neither: rejected.

Generation is constrained by an xgrammar grammar of this format for the sample's subject count
(`plan_grammar`), so a finished output always parses; rule 6 is the one repair a constrained
output can still need (the grammar cannot count cells).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field


from music_model.subjects.decimate import mentioned, token
from music_model.subjects.layout import GRID, layout_to_text, text_to_layout

_MAX_UTF8_BYTES = 4  # of one character: a plan word admits any non-control character

SUBJECTS_HEADER = "Subjects:"
RELATIONS_HEADER = "Relations:"
LAYOUT_HEADER = "Layout:"
RELATION_PREFIX = "- "
FIELD_SEPARATOR = " | "
MAX_SUBJECTS = 12

# What `str.split()` splits on: these never appear inside a canonical text.
_WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SUBJECT_LINE = re.compile(r"^<s(\d+)>(?: (.*))?$")


class PlanError(ValueError):
    """A plan text that does not parse, or a plan that cannot be repaired; the message says why."""


def canonical_text(text: str) -> str:
    """`text` as a plan field: control characters removed, `|` as `/`, whitespace runs as one
    space, stripped."""
    return " ".join(_CONTROL.sub(" ", text).replace("|", "/").split())


@dataclass(frozen=True)
class SubjectNote:
    id: int
    role: str
    placement: str


@dataclass(frozen=True)
class Plan:
    """The planner's output: a CoT entry per subject (IDs 1..n in order), relations, and the
    layout (grid x grid subject IDs, row-major, 0 = background)."""

    subjects: tuple[SubjectNote, ...]
    relations: tuple[str, ...]
    layout: tuple[int, ...]

    @property
    def n_subjects(self) -> int:
        return len(self.subjects)

    @property
    def grid(self) -> int:
        return round(len(self.layout) ** 0.5)

    def cot(self) -> dict:
        """The CoT in the published dataset's JSON shape."""
        return {"subjects": [{"id": s.id, "role": s.role, "placement": s.placement} for s in self.subjects],
                "relations": list(self.relations)}

    def cells(self, subject_id: int) -> list[int]:
        return [i for i, value in enumerate(self.layout) if value == subject_id]


def check_plan(plan: Plan) -> None:
    """Raise PlanError naming the first way `plan` breaks the format's rules."""
    n = plan.n_subjects
    if not 1 <= n <= MAX_SUBJECTS:
        raise PlanError(f"a plan has 1..{MAX_SUBJECTS} subjects, got {n}")
    for expected, note in enumerate(plan.subjects, 1):
        if note.id != expected:
            raise PlanError(f"subject IDs must be 1..{n} in order; entry {expected} has ID {note.id}")
        for name, text in (("role", note.role), ("placement", note.placement)):
            if not text or canonical_text(text) != text:
                raise PlanError(f"{token(note.id)} {name} {text!r} is not a canonical text (see canonical_text)")
    for relation in plan.relations:
        if not relation or canonical_text(relation) != relation:
            raise PlanError(f"relation {relation!r} is not a canonical text")
    grid = plan.grid
    if grid < 2 or grid * grid != len(plan.layout):
        raise PlanError(f"the layout has {len(plan.layout)} cells, not a square grid of at least 2x2")
    unknown = sorted({v for v in plan.layout if not 0 <= v <= n})
    if unknown:
        raise PlanError(f"the layout holds unknown subject IDs {unknown} (subjects are 1..{n})")
    empty = [s for s in range(1, n + 1) if s not in plan.layout]
    if empty:
        raise PlanError(f"subjects {', '.join(token(s) for s in empty)} have no layout cell")


def format_plan(plan: Plan) -> str:
    """The plan as its text (the format in the module docstring)."""
    check_plan(plan)
    lines = [SUBJECTS_HEADER]
    lines += [f"{token(s.id)} {s.role}{FIELD_SEPARATOR}{s.placement}" for s in plan.subjects]
    lines += [RELATIONS_HEADER, *(RELATION_PREFIX + r for r in plan.relations), LAYOUT_HEADER]
    lines.append(layout_to_text(list(plan.layout), plan.grid))
    return "\n".join(lines)


def parse_plan(text: str, grid: int = GRID) -> Plan:
    """The plan of a text in exactly the format `format_plan` writes; PlanError otherwise."""
    lines = text.split("\n")
    if lines[0] != SUBJECTS_HEADER:
        raise PlanError(f"line 1 must be {SUBJECTS_HEADER!r}, got {lines[0]!r}")
    try:
        relations_at = lines.index(RELATIONS_HEADER)
        layout_at = lines.index(LAYOUT_HEADER, relations_at)
    except ValueError:
        raise PlanError(f"no {RELATIONS_HEADER!r} line followed by a {LAYOUT_HEADER!r} line") from None
    notes = []
    for number, line in enumerate(lines[1:relations_at], 2):
        match = _SUBJECT_LINE.match(line)
        if not match or match.group(2) is None or FIELD_SEPARATOR not in match.group(2):
            raise PlanError(f"line {number} is not '<sN> ROLE | PLACEMENT': {line!r}")
        role, placement = match.group(2).split(FIELD_SEPARATOR, 1)
        notes.append(SubjectNote(int(match.group(1)), role, placement))
    relations = []
    for number, line in enumerate(lines[relations_at + 1 : layout_at], relations_at + 2):
        if not line.startswith(RELATION_PREFIX):
            raise PlanError(f"line {number} is not '- RELATION': {line!r}")
        relations.append(line[len(RELATION_PREFIX):])
    rows = lines[layout_at + 1 :]
    if len(rows) != grid:
        raise PlanError(f"the layout has {len(rows)} rows, expected {grid}")
    layout = []
    for number, row in enumerate(rows, layout_at + 2):
        cells = row.split(" ")
        if len(cells) != grid or not all(re.fullmatch(r"0|[1-9]\d*", c) for c in cells):
            raise PlanError(f"line {number} is not {grid} IDs separated by single spaces: {row!r}")
        layout.extend(int(c) for c in cells)
    plan = Plan(tuple(notes), tuple(relations), tuple(layout))
    check_plan(plan)
    return plan


# --- lenient reading and repair ---------------------------------------------------------------------


@dataclass
class PlanReading:
    """A model output read by `read_plan`: the repaired plan (None when rejected), the repairs made
    (empty for an output that was already a valid plan) and the rejection reason."""

    text: str
    plan: Plan | None
    repairs: list[str] = field(default_factory=list)
    error: str | None = None
    seed: int | None = None

    @property
    def ok(self) -> bool:
        return self.plan is not None


def placement_of_cells(cells: Sequence[int], grid: int) -> str:
    """Words for where a set of cells is: the annotate stage's vocabulary (`top left of the image`)."""
    rows = [c // grid for c in cells]
    cols = [c % grid for c in cells]
    cy = (min(rows) + max(rows) + 1) / 2 / grid
    cx = (min(cols) + max(cols) + 1) / 2 / grid
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    return f"{vertical} {horizontal} of the image"


def placement_point(words: str) -> tuple[float, float]:
    """The point (x, y in [0, 1]) that placement words name; the centre when they name none."""
    lowered = set(re.findall(r"[a-z]+", words.lower()))
    y = 1 / 6 if lowered & {"top", "upper"} else 5 / 6 if lowered & {"bottom", "lower"} else 0.5
    x = 1 / 6 if "left" in lowered else 5 / 6 if "right" in lowered else 0.5
    return x, y


def _place(layout: list[int], subject: int, placement: str, grid: int) -> int | None:
    """Rule 6: the cell a subject with no cell gets, or None when there is none to give."""
    x, y = placement_point(placement)

    def distance(cell: int) -> float:
        return (((cell % grid) + 0.5) / grid - x) ** 2 + (((cell // grid) + 0.5) / grid - y) ** 2

    free = [c for c in range(grid * grid) if layout[c] == 0]
    if not free:
        free = [c for c in range(grid * grid) if layout.count(layout[c]) > 1]
    return min(free, key=lambda c: (distance(c), c)) if free else None


def repair_plan(notes: Sequence[tuple[int, str, str | None]], relations: Sequence[str], layout: Sequence[int],
                n_subjects: int, categories: Sequence[str] | None = None, grid: int = GRID) -> tuple[Plan, list[str]]:
    """Rules 2-6 applied to parsed parts: `notes` are (id, role, placement or None) in the order
    written. Returns the valid plan and the repairs made; raises PlanError when it cannot."""
    if not 1 <= n_subjects <= MAX_SUBJECTS:
        raise PlanError(f"a plan has 1..{MAX_SUBJECTS} subjects, got {n_subjects}")
    if len(layout) != grid * grid:
        raise PlanError(f"the layout has {len(layout)} cells, expected {grid}x{grid}")
    repairs: list[str] = []
    cells = [int(v) for v in layout]
    unknown = sorted({v for v in cells if not 0 <= v <= n_subjects})
    if unknown:
        cells = [v if 0 <= v <= n_subjects else 0 for v in cells]
        repairs.append(f"layout cells of unknown subjects {unknown} set to background")
    written: dict[int, tuple[str, str | None]] = {}
    for subject, role, placement in notes:
        if not 1 <= subject <= n_subjects:
            repairs.append(f"CoT entry for unknown subject {token(subject)} removed")
        elif subject in written:
            repairs.append(f"second CoT entry for {token(subject)} removed")
        else:
            written[subject] = (role, placement)
    subjects = []
    for subject in range(1, n_subjects + 1):
        role, placement = written.get(subject, (None, None))
        own = [c for c, v in enumerate(cells) if v == subject]
        where = placement_of_cells(own, grid) if own else "middle center of the image"
        fallback_role = canonical_text(categories[subject - 1]) if categories and subject <= len(categories) else ""
        if subject not in written:
            repairs.append(f"missing CoT entry for {token(subject)} filled")
        role_text = canonical_text(role or "") or fallback_role or "subject"
        placement_text = canonical_text(placement or "") or where
        if subject in written and (role_text != role or placement_text != placement):
            repairs.append(f"CoT entry for {token(subject)} made canonical")
        subjects.append(SubjectNote(subject, role_text, placement_text))
    kept_relations = []
    for relation in relations:
        if not mentioned(relation) <= set(range(1, n_subjects + 1)):
            repairs.append(f"relation naming an unknown subject removed: {relation!r}")
            continue
        text = canonical_text(relation)
        if not text:
            repairs.append("empty relation removed")
            continue
        if text != relation:
            repairs.append(f"relation made canonical: {relation!r}")
        kept_relations.append(text)
    for note in subjects:
        if note.id in cells:
            continue
        cell = _place(cells, note.id, note.placement, grid)
        if cell is None:
            raise PlanError(f"{token(note.id)} has no layout cell and no cell can be freed for it")
        repairs.append(f"{token(note.id)} had no layout cell: given cell {cell} (row {cell // grid}, column {cell % grid})")
        cells[cell] = note.id
    plan = Plan(tuple(subjects), tuple(kept_relations), tuple(cells))
    check_plan(plan)
    return plan, repairs


def read_plan(text: str, n_subjects: int, categories: Sequence[str] | None = None, grid: int = GRID) -> PlanReading:
    """A model's output read leniently and repaired by the module's rules (never raises)."""
    try:
        try:
            plan = parse_plan(text, grid)
            if plan.n_subjects == n_subjects:
                return PlanReading(text, plan)
        except PlanError:
            pass
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        heads = {}
        for header in (SUBJECTS_HEADER, RELATIONS_HEADER, LAYOUT_HEADER):
            found = [i for i, line in enumerate(lines) if line.lower() == header.lower()]
            if not found:
                raise PlanError(f"no {header!r} line")
            heads[header] = found[0]
        if not heads[SUBJECTS_HEADER] < heads[RELATIONS_HEADER] < heads[LAYOUT_HEADER]:
            raise PlanError(f"the headers are not in the order {SUBJECTS_HEADER} {RELATIONS_HEADER} {LAYOUT_HEADER}")
        notes = []
        for line in lines[heads[SUBJECTS_HEADER] + 1 : heads[RELATIONS_HEADER]]:
            match = re.match(r"^<s(\d+)>\s*(.*)$", line)
            if not match:
                raise PlanError(f"a CoT line does not start with a subject tag: {line!r}")
            body = match.group(2)
            role, placement = (part.strip() for part in body.split("|", 1)) if "|" in body else (body, None)
            notes.append((int(match.group(1)), role, placement))
        relations = [line.removeprefix("-").strip() for line in lines[heads[RELATIONS_HEADER] + 1 : heads[LAYOUT_HEADER]]]
        rows = lines[heads[LAYOUT_HEADER] + 1 :]
        try:
            layout = text_to_layout("\n".join(rows), grid).tolist()
        except ValueError as error:
            raise PlanError(str(error)) from None
        plan, repairs = repair_plan(notes, relations, layout, n_subjects, categories, grid)
        return PlanReading(text, plan, repairs)
    except PlanError as error:
        return PlanReading(text, None, error=str(error))


def plan_from_sample(cot: str | dict, layout: Sequence[int], n_subjects: int, categories: Sequence[str] | None = None,
                     grid: int = GRID) -> tuple[Plan, list[str]]:
    """The target plan of a published sample (its CoT JSON and layout), by the same repair rules."""
    data = json.loads(cot) if isinstance(cot, str) else cot
    notes = [(int(s["id"]), str(s.get("role", "")), str(s.get("placement", ""))) for s in data.get("subjects", [])]
    return repair_plan(notes, [str(r) for r in data.get("relations", [])], list(layout), n_subjects, categories, grid)


# --- constrained generation -------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanBounds:
    """Bounds of a generated plan's texts, so every generation ends within a known token count."""

    max_relations: int = 6
    max_field_words: int = 12
    max_word_chars: int = 24
    grid: int = GRID

    def max_bytes(self, n_subjects: int) -> int:
        """The longest text the grammar allows, in UTF-8 bytes: a token is at least one byte, not one
        character, and a word may hold any non-control character (up to 4 bytes)."""
        text = self.max_field_words * (self.max_word_chars * _MAX_UTF8_BYTES + 1)
        subject_line = len(token(n_subjects)) + 1 + 2 * text + len(FIELD_SEPARATOR) + 1
        row = self.grid * (len(str(n_subjects)) + 1)
        headers = len(SUBJECTS_HEADER) + len(RELATIONS_HEADER) + len(LAYOUT_HEADER) + 3
        return headers + n_subjects * subject_line + self.max_relations * (len(RELATION_PREFIX) + text + 1) + self.grid * row


def _ebnf_string(text: str) -> str:
    return json.dumps(text)


def plan_grammar(n_subjects: int, bounds: PlanBounds) -> str:
    """The EBNF (xgrammar) of plan texts for `n_subjects` subjects: headers, one CoT line per
    subject in order, bounded canonical texts, at most `max_relations` relations, a grid x grid
    layout of IDs 0..n."""
    if not 1 <= n_subjects <= MAX_SUBJECTS:
        raise ValueError(f"a plan has 1..{MAX_SUBJECTS} subjects, got {n_subjects}")
    excluded = "".join(f"\\u{ord(c):04x}" for c in _WHITESPACE + "|")
    subject_rules = " ".join(f'{_ebnf_string(f"{token(k)} ")} text {_ebnf_string(FIELD_SEPARATOR)} text "\\n"'
                             for k in range(1, n_subjects + 1))
    cell = " | ".join(_ebnf_string(str(k)) for k in range(n_subjects + 1))
    grid = bounds.grid
    rows = ' "\\n" '.join(["row"] * grid)
    return "\n".join([
        f'root ::= {_ebnf_string(SUBJECTS_HEADER + chr(10))} {subject_rules} {_ebnf_string(RELATIONS_HEADER + chr(10))} '
        f'relation{{0,{bounds.max_relations}}} {_ebnf_string(LAYOUT_HEADER + chr(10))} {rows}',
        f'relation ::= {_ebnf_string(RELATION_PREFIX)} text "\\n"',
        f'text ::= word (" " word){{0,{bounds.max_field_words - 1}}}',
        f"word ::= [^\\x00-\\x1f\\x7f-\\x9f{excluded}]{{1,{bounds.max_word_chars}}}",
        f'row ::= cell (" " cell){{{grid - 1}}}',
        f"cell ::= {cell}",
    ])
