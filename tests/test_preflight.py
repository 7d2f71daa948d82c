"""Preflight (`tasks.checks.preflight`): a spec whose models cannot load, or whose disk is too small, fails
in seconds with one line per problem and runs no task; the commits a build was made with are
recorded, shown on its card, and a resume whose commits changed is refused.

The hub is the real client against real answers: an empty cache under HF_HUB_OFFLINE, a local
server on 127.0.0.1 (through HF_ENDPOINT) answering as the hub answers for a gated repository, and
a Hugging Face cache laid out as the hub client writes it, holding a zoo checkpoint as a hub repo."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from data_specs import shipped

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def spec_file(folder: Path, **changes) -> Path:
    """The shipped tiny spec writing under `folder`, with top-level keys and `roles.<name>` replaced."""
    data = yaml.safe_load(shipped("tiny.yaml").read_text()) | {"output_root": str(folder / "out")}
    for name, role in changes.pop("roles", {}).items():
        data["roles"][name] = {**data["roles"][name], **role}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(data | changes))
    return path


def music(*args: str, env: dict | None = None, timeout: int = 60) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return done, time.perf_counter() - started


def hub_env(tmp_path: Path, **extra: str) -> dict:
    """An empty Hugging Face cache and no token, whatever this machine holds."""
    env = {"HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": ""}
    return {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")}, **env, **extra}


def one_error_line(done: subprocess.CompletedProcess) -> str:
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr + done.stdout
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("error: ")
    return errors[0]


def test_a_missing_local_folder_is_one_line(tmp_path):
    done, seconds = music("roles", "check", str(spec_file(tmp_path, roles={"llm": {"model": str(tmp_path / "qwen")}})))
    line = one_error_line(done)
    assert done.returncode == 2 and "roles.llm.model" in line and "does not exist" in line
    assert seconds < 10


def test_a_local_folder_without_its_checkpoint_is_one_line(tmp_path):
    (tmp_path / "qwen").mkdir()
    done, seconds = music("roles", "check", str(spec_file(tmp_path, roles={"llm": {"model": str(tmp_path / "qwen")}})))
    line = one_error_line(done)
    assert done.returncode == 1 and line.startswith("error: roles.llm:") and "config.json" in line
    assert seconds < 10


def test_a_hub_model_absent_from_an_empty_cache_offline_is_one_line(tmp_path):
    spec = spec_file(tmp_path, roles={"llm": {"model": "Qwen/Qwen3-8B"}})
    done, seconds = music("roles", "check", str(spec), env=hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    line = one_error_line(done)
    assert done.returncode == 1
    assert line.startswith("error: roles.llm: Qwen/Qwen3-8B is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in line and "hf download Qwen/Qwen3-8B" in line
    assert seconds < 10


class GatedHub(BaseHTTPRequestHandler):
    """The hub's answers for a gated repository and a visitor without access: its model info is
    public, its auth check (and every file) is refused with the GatedRepo error code."""

    def do_GET(self):
        repo = "black-forest-labs/FLUX.1-dev"
        if self.path.startswith(f"/api/models/{repo}/auth-check"):
            self.answer(401, {"error": f"Access to model {repo} is restricted. You must have access to it and be "
                                       "authenticated to access it. Please log in."},
                        {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted."})
        elif self.path.startswith(f"/api/models/{repo}"):
            self.answer(200, {"id": repo, "modelId": repo, "sha": COMMIT_A, "gated": "manual", "private": False,
                              "siblings": [{"rfilename": "model_index.json"}]})
        else:
            self.answer(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

    def answer(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def gated_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_gated_repository_is_one_line_naming_its_licence_page(tmp_path, gated_hub):
    spec = spec_file(tmp_path, roles={"t2i": {"model": "black-forest-labs/FLUX.1-dev"}})
    done, seconds = music("roles", "check", str(spec), env=hub_env(tmp_path, HF_ENDPOINT=gated_hub))
    line = one_error_line(done)
    assert done.returncode == 1 and line.startswith("error: roles.t2i: black-forest-labs/FLUX.1-dev is gated")
    assert f"{gated_hub}/black-forest-labs/FLUX.1-dev" in line and "hf auth login" in line
    assert seconds < 10


def test_too_little_disk_is_one_line(tmp_path):
    done, seconds = music("roles", "check", str(spec_file(tmp_path, num_source_images=10**9)))
    line = one_error_line(done)
    assert done.returncode == 1 and line.startswith("error: disk: the build needs about") and "GiB free" in line
    assert seconds < 10


def test_a_build_that_fails_preflight_runs_no_task(tmp_path):
    spec = spec_file(tmp_path, roles={"llm": {"model": "Qwen/Qwen3-8B"}, "vlm": {"model": "Qwen/Qwen2.5-VL-7B-Instruct"}})
    done, seconds = music("build", str(spec), env=hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    errors = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line.split(":")[1].strip() for line in errors] == ["roles.llm", "roles.vlm"]
    assert "Prefect UI" not in done.stdout  # stopped before the server, so before any flow or task
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and not p.name.endswith(".lock")]  # no stage wrote
    assert seconds < 10


@pytest.mark.prefect
def test_the_card_states_licences_and_revisions(tiny_build):
    card = (tiny_build["dir"] / "dataset" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == "other" and "Licences" in header["license_name"]  # the zoo's Apache 2.0 and CC BY 4.0
    assert "## Licences" in card and "Creative Commons Attribution 4.0" in card
    made_with = json.loads((tiny_build["dir"] / "models.json").read_text())
    assert set(made_with) == {"llm", "vlm", "t2i", "editor", "detector", "segmenter", "clip", "dino"}
    for role in made_with.values():
        assert role["source"] == "zoo" and f"zoo entry sha256 `{role['commit'][:16]}`" in card


def hub_snapshot(cache: Path, repo: str, commit: str, files: Path) -> None:
    """A repo at `commit` in the hub client's cache layout, `main` pointing at it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


@pytest.mark.prefect
@pytest.mark.slow
def test_a_resume_whose_commit_changed_is_refused_until_pinned(tmp_path, zoo_root):
    """A zoo checkpoint served as a hub repo from the cache (HF_HUB_OFFLINE): the build loads and
    records commit A; `main` moves to B and the resume stops in one line; pinned to A it resumes
    with no task run."""
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1")
    cache = Path(env["HF_HUB_CACHE"])
    hub_snapshot(cache, "music-test/dino", COMMIT_A, zoo_root / "dino_vits16")
    spec = spec_file(tmp_path, name="pinned", num_source_images=8, roles={"dino": {"model": "music-test/dino"}})
    done, _ = music("build", str(spec), "--json", str(tmp_path / "first.json"), env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    build = tmp_path / "out" / "pinned"
    assert json.loads((build / "models.json").read_text())["dino"] == {
        "model": "music-test/dino", "source": "cache", "commit": COMMIT_A,
        "licence": {"license": "unknown", "name": "not stated here", "link": "https://huggingface.co/music-test/dino"}}
    assert f"`{COMMIT_A}`" in (build / "dataset" / "README.md").read_text()

    hub_snapshot(cache, "music-test/dino", COMMIT_B, zoo_root / "dino_vits16")  # main moves on
    done, seconds = music("build", str(spec), env=env)
    line = one_error_line(done)
    assert done.returncode == 2 and line.startswith("error: roles.dino:")
    assert f"at commit {COMMIT_A}" in line and f"resolves it to {COMMIT_B}" in line and f"revision: {COMMIT_A}" in line
    assert seconds < 10

    pinned = spec_file(tmp_path, name="pinned", num_source_images=8,
                       roles={"dino": {"model": "music-test/dino", "revision": COMMIT_A}})
    done, _ = music("build", str(pinned), "--json", str(tmp_path / "resumed.json"), env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "resumed.json").read_text())["task_runs"] == 0
