"""Everything that touches a model or its math, usable without Prefect (a notebook, another
orchestrator). One subpackage per concern; imports only go down this list:

- `music`: the MUSIC model: planner, renderer, LoRA training, generation (Pass@N).
- `scoring`: DINO / CLIP-I / CLIP-T, DreamBench, multi-subject scoring, Pass@N curves.
- `roles`: every model behind one interface per role, the registry that owns their memory, device
  slots, structured generation.
- `zoo`: the tiny random checkpoints of every role, built on first use.
- `subjects`: the 8x8 layout grid, subject decimation and `<sN>` renumbering, preview sheets.
- `media`: images, masks and the evaluation protocol's preprocessing; no project imports.

`paths` (where state lives) and `noise` (known, harmless library messages) import nothing from
the project and may be used by any of them. Outside this package only `data_specs` is imported.
`tests/import_graph.py` checks these directions.
"""
