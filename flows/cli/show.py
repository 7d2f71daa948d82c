"""`music show`: preview sheets (PNG) of a published training set or MSIC benchmark, one per sample:
the target with its boxes, tags and 8x8 layout, each reference, the instruction and the CoT."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli.shared import fail

# What each published folder holds: its Parquet files, its ID column, and how a row becomes a sheet.
KINDS = {"dataset": ("train-*.parquet", "id", "from_published"), "msic": ("test-*.parquet", "case_id", "from_case")}


def published_folder(target: Path) -> tuple[Path, str]:
    """The published folder a path names (a dataset or MSIC folder, or a build spec whose output it
    is) and its kind."""
    if target.suffix in (".yaml", ".yml"):
        from tasks.engine.build_paths import build_dir
        from tasks.stages import load_build_spec

        spec = load_build_spec(target)
        target = build_dir(spec) / ("msic" if spec.msic else "dataset")
    for kind, (pattern, _, _) in KINDS.items():
        if any((target / "data").glob(pattern)):
            return target, kind
    raise FileNotFoundError(f"{target}: no published training set (data/train-*.parquet) or MSIC cases (data/test-*.parquet)")


def show(
    target: Path = typer.Argument(..., help="A published dataset folder, an MSIC folder, or the build spec that made one."),
    ids: Optional[list[str]] = typer.Option(None, "--ids", help="Sample or case IDs (repeat the option or separate by commas); "
                                                               "default: the subset the build previewed."),
    count: int = typer.Option(6, min=1, help="Without --ids and without a published preview: how many samples."),
    out: Path = typer.Option(Path("preview"), "--out", help="Folder the sheets are written to, as <id>.png."),
) -> None:
    """Render a preview sheet per sample."""
    import pyarrow.parquet as pq

    from music_model.subjects import preview
    from tasks.engine.contract import read_rows
    from tasks.publishing.publish import preview_ids, write_sheets

    try:
        folder, kind = published_folder(target)
    except (FileNotFoundError, ValueError) as error:
        fail(error)
    pattern, id_column, convert = KINDS[kind]
    files = sorted((folder / "data").glob(pattern))
    # Read the ID column first, then only the files holding the wanted rows: a dataset is large.
    where = {i: path for path in files for i in pq.read_table(path, columns=[id_column]).column(id_column).to_pylist()}
    wanted = [i.strip() for value in ids or [] for i in value.split(",") if i.strip()]
    if not wanted:
        wanted = sorted(p.stem for p in (folder / "preview").glob("*.png") if p.stem in where) or preview_ids(0, list(where), count)
    unknown = [i for i in wanted if i not in where]
    if unknown:
        fail(f"not in {folder}: {', '.join(unknown)}")
    rows = {row[id_column]: row for path in dict.fromkeys(where[i] for i in wanted) for row in read_rows(path) if row[id_column] in wanted}
    to_sheet = getattr(preview, convert)
    paths = write_sheets(out, [(i, preview.render_sheet(to_sheet(rows[i]))) for i in wanted])
    for path in paths:
        typer.echo(str(path))
    typer.echo(f"{len(paths)} preview sheet(s) of {kind} {folder} in {out}")
