"""The README's shell blocks, run as a user runs them, so the README cannot drift from the code.

Each section (Quickstart, Commands, Operations) is pasted into a new shell: a fresh environment
holding only the system PATH, a temporary HOME (so `~/.prefect` is the test's own), a temporary
MUSIC_HOME, MUSIC_ZOO_DIR (the session's tiny zoo, built once) and, in place of `pip install -e`
of a fresh clone, PYTHONPATH = a copy of the project whose `.venv` links to this one. The copy is
the working directory, so `out/` and the deployments' working directory are the copy's.

Lines run one by one in that shell's state: `source` and `export` carry over, a line ending in `&`
runs in the background until `kill %N` or the section's end, comments are skipped. Placeholders
(`DIR`, `OLD NEW`, `[optional flags]`) are filled from `CONCRETE`; commands that must not run here
run in the cheap form `CONCRETE` gives, with the reason beside it. Each command must exit 0 and
print the lines `EXPECT` names for its prefix (an unknown command must exit 0), and none of the
library noise in `NOISE`. The commands and their outcomes are written to tests/output/readme.md."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
REPORT = ROOT / "tests" / "output" / "readme.md"
SECTIONS = ("Quickstart", "Commands", "Operations")
pytestmark = pytest.mark.prefect  # the session's server makes the builds the sections start from (`project`)


def newest(pattern: str):
    """A placeholder value: the newest path matching `pattern` in the project copy."""
    def find(project: Path) -> str:
        found = sorted(project.glob(pattern), key=lambda p: p.stat().st_mtime)
        assert found, f"nothing matches {pattern} in {project}: the README command that makes it did not run"
        return str(found[-1].relative_to(project))
    return find


@dataclass
class Background:
    """Run `command` in the background, owned by the test (not one of the user's `%N` jobs)."""
    command: str


@dataclass
class Stop:
    """Stop the test's background process whose command starts with `name`, children included."""
    name: str


# Optional flags in [brackets] are left out: the defaults run (`--device cuda` would need a GPU;
# benchmarks/gpu_roles.sh runs that form on a GPU machine).
OPTIONAL = re.compile(r"\s*\[--[^\]]*\]")
# A README line with placeholders or a machine-wide effect -> what the test runs instead (and why).
CONCRETE = {
    # Re-installing .venv takes minutes: the dry run shows the commands it runs; test_commands runs them.
    "make demo": ["make -n demo"],
    "make test": [],  # the suite this test is part of
    "make test-fast": [],  # part of this suite
    # One regeneration here: diffed with itself (the diff's own cases are in tests/test_msic.py).
    "music msic diff OLD NEW": ["music msic diff out/msic_tiny/msic out/msic_tiny/msic"],
    "music msic check-overlap MSIC TRAINSET": ["music msic check-overlap out/msic_tiny/msic out/tiny/dataset"],
    # The build above made one release: diffed with itself (tests/test_releases.py diffs two).
    "music diff data_specs/tiny.yaml [A] [B]": ["music diff data_specs/tiny.yaml v1 v1"],
    "music release list|promote|rollback SPEC": ["music release list data_specs/tiny.yaml"],
    # With the adapters `music train` wrote, as a user follows training: `music pipeline` then finds
    # these generations (same models, adapters and inputs) instead of making them again.
    "music generate msic|dreambench|case ...": [
        "music generate msic --adapters out/train/train-tiny/adapter",
        "music generate dreambench --adapters out/train/train-tiny/adapter",
        "music generate case --instruction '<s1> next to <s2>' --reference tests/data/dreambench/dog/00.jpg "
        "--reference tests/data/dreambench/teapot/00.jpg --category dog --category teapot --out out/case"],
    "music eval dreambench --images DIR --spec eval_tiny.yaml": [
        ("music eval dreambench --images {} --spec eval_tiny.yaml", newest("out/train/*/generated/dreambench-*/images"))],
    "music eval msic --cases CASES.parquet --spec eval_tiny.yaml": [
        ("music eval msic --cases {} --spec eval_tiny.yaml", newest("out/train/*/generated/msic-*/cases.parquet"))],
    # N = 8 over every tiny MSIC case takes minutes: tests/test_passn_budget.py runs the command on 3 cases.
    "music eval passn-budget --spec data_specs/train_tiny.yaml --candidates 8": [],
    "music server / music server stop": ["music server", "music server stop"],
    # `ray start` daemonizes on the fixed port 6379 and `ray stop` stops every Ray of the machine's
    # user: on a shared machine the test runs its own head on a free port in the foreground and stops it.
    "ray start --head --node-ip-address 127.0.0.1 --port 6379": [Background(
        "ray start --head --node-ip-address 127.0.0.1 --port {ray_port} --block")],
    "ray stop": [Stop("ray")],
}
# The same for every line: the Ray port.
SUBSTITUTE = {":6379": ":{ray_port}"}

# Command prefix (longest wins) -> lines its output must contain (regexes, multiline).
EXPECT = {
    "make -n demo": [r"music zoo build", r"music pipeline data_specs/train_tiny\.yaml"],
    "music zoo build": [r"^zoo: \S+ .* manifest: \S+manifest\.json$"],
    "music roles check": [r"^clip\S*\s+transformers\s", r"^editor\S*\s+diffusers\s"],
    "music roles check data_specs/tiny.yaml": [r"^llm\s+zoo:qwen3\s+zoo\s+[0-9a-f]{12}\s+apache-2\.0\s+ok$", r"^disk\s+about "],
    "music build": [r"^Prefect UI: http://127\.0\.0\.1:\d+$", r"^Output: /\S+/out/tiny$",
                    r"^Published [1-9]\d* samples to /\S+/out/tiny/dataset"],
    "music msic build": [r"^Prefect UI: http://127\.0\.0\.1:\d+$", r"out/msic_tiny/msic"],
    "music msic diff": [r"^added: 0$", r"^removed: 0$", r"^changed: 0$", r"^identical$"],
    "music msic check-overlap": [r"^no overlap: \d+ cases against out/tiny/dataset"],
    "music diff": [r"^v1 -> v1: (\d+) -> \1 samples; added 0, removed 0, changed 0$"],
    "music release list": [r"^\* v1 +parent - +accepted +\d+ samples"],
    "music train": [r"^trained \d+ of \d+ steps", r"^adapters: \S+/adapter"],
    "music generate msic": [r"^generated into \S+/generated/msic-", r"^  Pass@\d+ "],
    "music generate dreambench": [r"^generated into \S+/generated/dreambench-"],
    "music generate case": [r"^\d+ candidates in out/case; picks: clip_t -> \d+\.png, identity_aware -> \d+\.png$"],
    "music eval dreambench": [r"^scored [1-9]\d* images of \d+ subjects"],
    "music eval msic": [r"^scored [1-9]\d* images of \d+ cases"],
    "music pipeline": [r"^dataset: \S+/out/tiny/dataset$", r"^MSIC: \S+/out/msic_tiny/msic$", r"^report: \S+pipeline_report\.md"],
    "music calibrate": [r"^Keep rates:$", r"^  rerender\.min_dino\s", r"^table: /\S+/out/tiny-calibrate-8/tiny/calibrate/calibration\.md$",
                        r"^plot: /\S+/out/tiny-calibrate-8/tiny/calibrate/thresholds\.png$"],
    "music server stop": [r"^stopped$"],
    "music server": [r"^Prefect UI: http://127\.0\.0\.1:\d+$",
                     r"^Prefect profile 'music': PREFECT_API_URL=http://127\.0\.0\.1:\d+/api \(saved in \S+/\.prefect/profiles\.toml\)$"],
    "prefect profile use music": [r"Connected to Prefect server using profile 'music'"],
    "music deploy": [r"^build-training-set/rebuild-tiny\s+pool music-gpu", r"^Prefect UI: \S+/deployments$"],
    "music worker": [r"Worker '[^']+' started!"],  # background: its ready line
    "prefect deployment run build-training-set/rebuild-tiny": [
        r"Created flow run", r"Flow run finished successfully in 'Completed'"],
    "ray start": [r"Ray runtime started"],
}
# Library messages a user cannot act on, filtered by default (`music --verbose` shows them).
NOISE = ["FutureWarning", "Token indices sequence length", "No LoRA keys associated", "Writing model shards",
         "hook 'on_flow_running'", "Hook 'on_flow_running'", "it/s]"]
BACKGROUND_READY_S = 180
COMMAND_TIMEOUT_S = 900


def readme_blocks(section: str) -> list[str]:
    """The shell lines of the ```bash blocks under `## section` (indented blocks included), without comments."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {section}' section"
    lines = []
    for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", match.group(1), re.S | re.M):
        for line in block.splitlines():
            command = strip_comment(line).strip()
            if command:
                lines.append(command)
    assert lines, f"README.md '## {section}' has no bash block"
    return lines


def strip_comment(line: str) -> str:
    """`line` without its `# comment`: a # at the start or after a blank, outside quotes and backticks."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"`":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def expected(command: str) -> list[str]:
    matches = [prefix for prefix in EXPECT if command == prefix or command.startswith(prefix + " ")]
    return EXPECT[max(matches, key=len)] if matches else []


@dataclass
class Outcome:
    section: str
    readme: str
    command: str
    returncode: int | None
    seconds: float
    output: str
    note: str = ""


@dataclass
class Job:
    command: str
    process: subprocess.Popen
    log: Path
    number: int | None  # its `%N` as bash numbers the user's jobs; None: the test's own


@dataclass
class Shell:
    """A new shell in the project copy: its environment, its background jobs, what it ran."""
    section: str
    project: Path
    env: dict[str, str]
    logs: Path
    values: dict[str, object]
    jobs: list[Job] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def run_readme_line(self, line: str) -> None:
        concrete = CONCRETE.get(line, [OPTIONAL.sub("", line)])
        if not concrete:
            self.outcomes.append(Outcome(self.section, line, "(not run)", None, 0.0, "", "this test suite itself"))
        for step in concrete:
            if isinstance(step, Background):
                self.start(self.fill(step.command), line, user_job=False)
            elif isinstance(step, Stop):
                self.stop([job for job in self.running() if not job.number and job.command.startswith(step.name)], line)
            else:
                command = self.fill(step[0].format(step[1](self.project)) if isinstance(step, tuple) else step)
                self.run(command, line)

    def fill(self, command: str) -> str:
        for old, new in SUBSTITUTE.items():
            command = command.replace(old, new)
        return command.format(**self.values)

    def run(self, command: str, readme: str) -> None:
        if command.endswith("&"):
            return self.start(command[:-1].strip(), readme, user_job=True)
        if match := re.fullmatch(r"kill((?: %\d+)+)", command):
            jobs = {job.number: job for job in self.running() if job.number}
            numbers = [int(n) for n in match.group(1).split("%")[1:]]
            assert all(n in jobs for n in numbers), f"`{command}`: no such job (running: {sorted(jobs)})"
            return self.kill([jobs[n] for n in numbers], readme)
        started = time.monotonic()
        if re.match(r"(source|\.|export) ", command):
            # Runs in this shell: take the environment it leaves.
            done = subprocess.run(["bash", "-c", f"{command} >/dev/null && env -0"], cwd=self.project, env=self.env,
                                  capture_output=True, timeout=60)
            if done.returncode == 0:
                self.env = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
            output = done.stderr.decode()
        else:
            done = subprocess.run(["bash", "-c", command], cwd=self.project, env=self.env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=COMMAND_TIMEOUT_S)
            output = done.stdout
        outcome = Outcome(self.section, readme, command, done.returncode, time.monotonic() - started, output)
        self.outcomes.append(outcome)
        assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{output[-4000:]}"
        check_output(outcome)

    def running(self) -> list[Job]:
        return [job for job in self.jobs if job.process.poll() is None]

    def start(self, command: str, readme: str, user_job: bool) -> None:
        log = self.logs / f"job{len(self.jobs) + 1}.log"
        number = max([job.number for job in self.running() if job.number] or [0]) + 1 if user_job else None
        with open(log, "w") as out:
            process = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.project, env=self.env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        job = Job(command, process, log, number)
        self.jobs.append(job)
        started = time.monotonic()
        ready = expected(command)
        while ready and not all(re.search(p, log.read_text(), re.M) for p in ready):
            assert process.poll() is None, f"`{command}` exited {process.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() - started < BACKGROUND_READY_S, f"`{command}` not ready:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        self.outcomes.append(Outcome(self.section, readme, command + " &", None, time.monotonic() - started,
                                     log.read_text(), "running in the background"))

    def kill(self, jobs: list[Job], readme: str, grace: float = 30.0) -> None:
        """SIGTERM, as `kill %N` sends it; each job must be gone within `grace` seconds, after a
        second SIGTERM at the most (the README says a Prefect worker busy shutting down needs one)."""
        started = time.monotonic()
        for job in jobs:
            if job.process.poll() is None:
                os.killpg(job.process.pid, signal.SIGTERM)
        for job in jobs:
            try:
                job.process.wait(grace)
            except subprocess.TimeoutExpired:
                if job.process.poll() is None:
                    os.killpg(job.process.pid, signal.SIGTERM)
                try:
                    job.process.wait(grace)
                except subprocess.TimeoutExpired:
                    force(job.process)
                    raise AssertionError(f"`{job.command}` still running {grace:.0f} s after a second SIGTERM") from None
            force(job.process)  # its children, if any outlived it
        output = "\n".join(f"{job.command}: exit {job.process.returncode}" for job in jobs)
        self.outcomes.append(Outcome(self.section, readme, f"(SIGTERM to {len(jobs)} background process(es))", 0,
                                     time.monotonic() - started, output))
        for job in jobs:
            check_output(Outcome(self.section, readme, job.command, 0, 0.0, job.log.read_text()))

    def stop(self, jobs: list[Job], readme: str) -> None:
        """The test's own background processes, stopped with all their children (no README promise
        rides on how they end: a short patience, so a Ray head's slow exit costs no time)."""
        assert jobs, f"`{readme}`: nothing of the test's running to stop"
        started = time.monotonic()
        for job in jobs:
            force(job.process, patience=2)
        self.outcomes.append(Outcome(self.section, readme, f"(stopped the test's `{jobs[0].command}`)", 0,
                                     time.monotonic() - started, ""))

    def close(self) -> None:
        for job in self.jobs:
            force(job.process)


def force(process: subprocess.Popen, patience: float = 10) -> None:
    """Stop what is left of a process group: SIGTERM twice (a Prefect worker takes the second as
    its SIGKILL; `ray start --block` leaves its GCS after the first), then SIGKILL, each signal
    given `patience` seconds."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + patience
        while process.poll() is None or group_alive(process.pid):  # poll() reaps the leader: a zombie counts as alive
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    if process.poll() is None:
        process.wait()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def check_output(outcome: Outcome) -> None:
    for pattern in expected(outcome.command):
        assert re.search(pattern, outcome.output, re.M), \
            f"`{outcome.command}` printed no line matching {pattern!r}:\n{outcome.output[-4000:]}"
    for noise in NOISE:
        assert noise not in outcome.output, f"`{outcome.command}` printed library noise {noise!r}:\n{outcome.output[-4000:]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_build, msic_build) -> Path:
    """A copy of the project as a fresh clone has it, its .venv linked to this one, and `out/`
    holding the session's builds of the shipped tiny and MSIC specs (what the README's
    `music build` and `music msic build` make there): those commands resume them, as a rerun
    does (the builds themselves, from scratch, are tests/test_build.py's and test_msic.py's)."""
    copy = tmp_path_factory.mktemp("readme") / "music"
    shutil.copytree(ROOT, copy, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "out", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", "output"))
    (copy / ".venv").symlink_to(ROOT / ".venv")
    for build in (tiny_build, msic_build):
        shutil.copytree(build["dir"], copy / "out" / build["dir"].name)
    # `music calibrate data_specs/tiny.yaml --sources 8` builds the tiny build's first shard: resumed, it only publishes.
    shutil.copytree(tiny_build["dir"], copy / "out" / "tiny-calibrate-8" / "tiny")
    return copy


@pytest.fixture(scope="module")
def outcomes():
    done: list[Outcome] = []
    yield done
    write_report(done)


@pytest.fixture(scope="module")
def user(project, zoo_root, tmp_path_factory) -> dict[str, str]:
    """What every new shell starts with, shared by the sections like one user's machine."""
    home = tmp_path_factory.mktemp("home")
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "TERM": "dumb",
            "MUSIC_HOME": str(home / ".cache" / "music"), "MUSIC_ZOO_DIR": str(zoo_root), "PYTHONPATH": str(project),
            "TMPDIR": os.environ.get("TMPDIR", "/tmp"), "COLUMNS": "200"}


@pytest.fixture
def shell(request, project, user, outcomes, tmp_path):
    section = request.param
    sh = Shell(section, project, dict(user), tmp_path, {"ray_port": free_port()})
    yield sh
    sh.close()
    outcomes.extend(sh.outcomes)
    # Whatever the section left running: stop our server (the shell's `music server stop` may not have run).
    subprocess.run(["bash", "-c", f"{VENV_BIN}/music server stop"], cwd=project, env={**user, "PATH": f"{VENV_BIN}:{user['PATH']}"},
                   capture_output=True, timeout=120)


def run_section(shell: Shell) -> None:
    for line in readme_blocks(shell.section):
        shell.run_readme_line(line)


@pytest.mark.parametrize("shell", ["Quickstart"], indirect=True)
def test_quickstart(shell):
    run_section(shell)
    # `make demo` runs only commands that the Commands section lists (and test_commands runs).
    dry_run = next(o for o in shell.outcomes if o.command == "make -n demo").output
    demo = [line.split("bin/", 1)[1] for line in dry_run.splitlines() if re.match(r"\S*bin/music ", line)]
    listed = readme_blocks("Commands")
    assert demo and all(any(line == d or line.startswith(d + " ") for line in listed) for d in demo), (demo, listed)


@pytest.mark.parametrize("shell", ["Commands"], indirect=True)
def test_commands(shell):
    assert shutil.which("music", path=shell.env["PATH"]) is None  # a new shell: the README's own line must put it there
    run_section(shell)
    assert shutil.which("music", path=shell.env["PATH"]) == str(VENV_BIN / "music")
    # The CLIP cut of the long renderer prompts is said in our words, once per stage and process.
    output = {o.command.split()[1]: o.output for o in shell.outcomes if o.command.startswith(("music train", "music pipeline"))}
    assert len(re.findall(r"\btrain: renderer prompts run past CLIP's 77 tokens", output["train"])) == 1
    assert len(re.findall(r"\bgenerate: renderer prompts run past CLIP's 77 tokens", output["pipeline"])) == 1


@pytest.mark.parametrize("shell", ["Operations"], indirect=True)
def test_operations(shell):
    run_section(shell)
    # The plain prefect CLI found the deployment through the `music` profile, not an environment variable.
    assert "PREFECT_API_URL" not in shell.env
    profiles = Path(shell.env["HOME"], ".prefect", "profiles.toml").read_text()
    assert re.search(r'^active = "music"$', profiles, re.M) and "[profiles.music]" in profiles


def write_report(outcomes: list[Outcome]) -> None:
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    rows = ["| section | README line | ran | exit | s | key output |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        key = [line for p in expected(o.command) for line in re.findall(rf"^.*(?:{p}).*$", o.output, re.M)[:1]]
        cells = [o.section, f"`{o.readme}`", f"`{o.command}`" if o.command != o.readme else "as written",
                 "-" if o.returncode is None else str(o.returncode), f"{o.seconds:.1f}", "<br>".join(key)[:300] or o.note]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    REPORT.write_text("# README commands run by tests/test_readme.py\n\n" + "\n".join(rows) + "\n")


def test_verbose_shows_what_is_filtered(user, tmp_path):
    """`music --verbose` (README, Commands) brings back what is filtered by default."""
    env = {**user, "PATH": f"{VENV_BIN}:{user['PATH']}"}
    build = ["zoo", "build", "--only", "qwen3", "--force", "--dir", str(tmp_path / "zoo")]
    quiet, verbose = (subprocess.run(["music", *flags, *build], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
                      for flags in ([], ["--verbose"]))
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr[-2000:] + verbose.stderr[-2000:]
    assert "Writing model shards" not in quiet.stdout + quiet.stderr
    assert "Writing model shards" in verbose.stderr
