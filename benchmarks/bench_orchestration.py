"""What one task run costs the orchestration, and how that grows with the number of task runs, with
the Prefect server on SQLite and on PostgreSQL side by side.

    python benchmarks/bench_orchestration.py [--task-runs 1000 10000] [--databases sqlite postgres] [--out DIR]

Each (database, size) is the tiny build with one source a shard, so N task runs are about N / 9
sources (9 stages, then publish), on a server of its own: its own state folder (SQLite: a new
file), or a new database of one PostgreSQL cluster this script starts (Debian's package). Figures:
- orchestration s / task run: the build's wall time minus its model time (model compute and
  loads, which the stage tables measure), over its task runs;
- server errors: ERROR lines and tracebacks in the server's log; client retries: the Prefect
  client's retry lines in the build's output;
- peak RSS of the build process and of the server (polled every half second);
- how long the build's flow-run page takes to show its name and state in the UI (headless
  Chromium, as tests/test_ui.py drives it).
Sizes run in turn, each on every database (results.json is rewritten after each row); the first
size of a database is the baseline of its ratios. Run it alone on an idle machine."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from local_postgres import local_cluster  # noqa: E402

STAGES = 9  # the training-set build's stages; publish is one task run more
RETRY = re.compile(r"retry|retrying|retryable", re.I)
SERVER_ERROR = re.compile(r"\bERROR\b|Traceback")


class PeakRss:
    """The largest RSS of a process and its children, polled in a thread."""

    def __init__(self, pid: int):
        self.process, self.peak, self.running = psutil.Process(pid), 0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while self.running:
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.5)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak / 2**20


def music(env: dict, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


def page_seconds(ui: str, run_id: str, run_name: str) -> float:
    """Seconds until the flow-run page shows the run's name and its Completed state."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1200"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    try:
        started = time.perf_counter()
        driver.get(f"{ui}/runs/flow-run/{run_id}")
        body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
        WebDriverWait(driver, 120, poll_frequency=0.1).until(lambda _: run_name in body() and "Completed" in body())
        return time.perf_counter() - started
    finally:
        driver.quit()


def run(database: str, url: str | None, task_runs: int, out: Path) -> dict:
    """One build of about `task_runs` task runs on a new server; its figures."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"MUSIC_HOME": str(out / "home"), "MUSIC_SLOT_DIR": str(out / "slots"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MUSIC_ZOO_DIR": os.environ.get("MUSIC_ZOO_DIR") or str(Path(os.environ.get("MUSIC_HOME", Path.home() / ".cache/music")) / "zoo")}
    started = music(env, "server", *(["--database-url", url] if url else []), timeout=300)
    if started.returncode != 0:
        raise SystemExit(f"{database}: the server did not start: {started.stderr.strip()[-2000:]}")
    record = json.loads((out / "home" / "prefect" / "server.json").read_text())
    env["PREFECT_API_URL"] = record["api_url"]
    server_rss = PeakRss(record["pid"])
    sources = max(1, -(-(task_runs - 1) // STAGES))
    spec = yaml.safe_load((ROOT / "data_specs" / "tiny.yaml").read_text())
    spec.update(name=f"orchestration-{task_runs}", num_source_images=sources, shard_size=1, output_root=str(out / "out"))
    spec_path, result_path = out / "spec.yaml", out / "result.json"
    spec_path.write_text(yaml.safe_dump(spec))
    try:
        begun = time.perf_counter()
        with open(out / "build.log", "w") as log:
            build = subprocess.Popen([sys.executable, "-m", "flows.cli", "build", str(spec_path), "--json", str(result_path)],
                                     cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(build.pid, 0)
        wall = time.perf_counter() - begun
        if status != 0:
            raise SystemExit(f"{database}, {task_runs} task runs: the build failed; see {out / 'build.log'}")
        result = json.loads(result_path.read_text())
        import httpx

        runs = httpx.post(f"{record['api_url']}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [f"build-{spec['name']}"]}}},
                          timeout=60).json()
        page = page_seconds(record["ui_url"], runs[0]["id"], runs[0]["name"])
    finally:
        peak_server = server_rss.stop()
        os.killpg(record["pid"], signal.SIGTERM)
    model = sum(t["model_seconds"] + t["load_seconds"] for t in result["stages"])
    server_log = (out / "home" / "prefect" / "server.log").read_text(errors="replace")
    build_log = (out / "build.log").read_text(errors="replace")
    return {"database": database, "task_runs": result["task_runs"], "sources": sources, "wall_s": wall, "model_s": model,
            "orchestration_s_per_task_run": (wall - model) / result["task_runs"],
            "server_errors": len(SERVER_ERROR.findall(server_log)), "client_retries": len(RETRY.findall(build_log)),
            "flow_peak_rss_mb": usage.ru_maxrss / 1024, "server_peak_rss_mb": peak_server, "page_s": page}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task-runs", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--databases", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/music-bench-orchestration"))
    args = parser.parse_args()
    rows = []
    header = (f"{'database':>8} {'task runs':>9} {'sources':>7} {'wall s':>8} {'model s':>8} {'orch s/run':>10} {'x':>5} "
              f"{'srv err':>7} {'retries':>7} {'flow MB':>8} {'x':>5} {'server MB':>9} {'page s':>7}")
    print(header, flush=True)
    bases: dict[str, dict] = {}
    with local_cluster() if "postgres" in args.databases else nullcontext() as cluster:
        # size by size, so that a run stopped early still has every database at the sizes it reached
        for size in args.task_runs:
            for database in args.databases:
                url = cluster.create_database(f"orchestration_{size}") if database == "postgres" else None
                row = run(database, url, size, args.out / database / str(size))
                base = bases.setdefault(database, row)
                rows.append(row)
                print(f"{database:>8} {row['task_runs']:>9} {row['sources']:>7} {row['wall_s']:>8.1f} {row['model_s']:>8.1f} "
                      f"{row['orchestration_s_per_task_run']:>10.3f} "
                      f"{row['orchestration_s_per_task_run'] / base['orchestration_s_per_task_run']:>5.2f} "
                      f"{row['server_errors']:>7} {row['client_retries']:>7} {row['flow_peak_rss_mb']:>8.0f} "
                      f"{row['flow_peak_rss_mb'] / base['flow_peak_rss_mb']:>5.2f} {row['server_peak_rss_mb']:>9.0f} "
                      f"{row['page_s']:>7.2f}", flush=True)
                (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
