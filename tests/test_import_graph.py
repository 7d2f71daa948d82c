"""The import graph: the project follows its layering rules, and the checker catches each kind of
break (so a clean result means something)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from import_graph import MUSIC_MODEL_LAYERS, TASKS_LAYERS, import_graph, layer_edges, violations

ROOT = Path(__file__).resolve().parents[1]


def test_the_project_imports_only_down_with_no_circle():
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "import_graph.py")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("import graph: OK")
    graph = import_graph(ROOT)
    # every subpackage of music_model has a row, and the code uses the layers the table describes
    parts = {module.split(".")[1] for module in graph if module.startswith("music_model.")}
    assert parts == set(MUSIC_MODEL_LAYERS)
    assert layer_edges(graph)["music"] >= {"roles", "scoring", "subjects", "media"}
    # tasks' floors are the pipeline's: every part has a row, and publishing stands on the stages
    assert {module.split(".")[1] for module in graph if module.startswith("tasks.")} == set(TASKS_LAYERS)
    tasks_edges = layer_edges(graph, "tasks")
    assert tasks_edges["engine"] == set() and tasks_edges["stages"] == {"engine"}
    assert tasks_edges["publishing"] == {"engine", "stages"} and "publishing" in tasks_edges["checks"]
    # the command-line modules form a tree: the sub-commands share flows.cli.shared, never flows.cli.main
    commands = [m for m in graph if m.startswith("flows.cli.") and m not in ("flows.cli.main", "flows.cli.__main__")]
    assert {"flows.cli.shared", "flows.cli.eval", "flows.cli.plan"} <= set(commands)
    assert not any("flows.cli.main" in graph[m] for m in commands)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("flows", "tasks", "music_model", "data_specs"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def test_the_checker_names_every_kind_of_break(tmp_path):
    root = _tree(tmp_path, {
        "data_specs/spec.py": "from tasks.engine.contract import run\n",                                 # upward
        "tasks/engine/contract.py": "def run():\n    from flows.cli import app\n",                       # upward, lazily
        "tasks/publishing/publish.py": "",
        "tasks/stages/compose.py": "from tasks.publishing.publish import publish_folder\n",            # floor break
        "tasks/extra.py": "",                                                                      # not in the table
        "music_model/media/__init__.py": "",
        "music_model/media/images.py": "from music_model.roles.clip import embed\n",              # layer break
        "music_model/roles/__init__.py": "",
        "music_model/roles/clip.py": "from music_model.media import images\n",                     # allowed, but a circle
        "music_model/scoring/__init__.py": "import prefect\n",                                     # prefect below tasks
        "music_model/extra/__init__.py": "",                                                       # not in the table
        "flows/cli.py": "from flows import eval_cli\n",
        "flows/eval_cli.py": "from .cli import app\n",                                             # relative circle
    })
    problems = "\n".join(violations(import_graph(root)))
    assert "data_specs.spec imports tasks.engine.contract: data_specs may not import tasks" in problems
    assert "tasks.engine.contract imports flows.cli: tasks may not import flows" in problems
    assert "music_model.media.images imports music_model.roles.clip: music_model.media may import only nothing" in problems
    assert "music_model.roles.clip imports" not in problems
    assert "import circle: music_model.media.images -> music_model.roles.clip" in problems
    assert "import circle: flows.cli -> flows.eval_cli" in problems
    assert "music_model.scoring imports prefect" in problems
    assert "music_model.extra has no row in MUSIC_MODEL_LAYERS" in problems
    assert "tasks.stages.compose imports tasks.publishing.publish: tasks.stages may import only engine" in problems
    assert "tasks.extra has no row in TASKS_LAYERS" in problems
    assert "tasks.publishing.publish imports" not in problems
