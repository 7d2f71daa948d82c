"""What holding a device slot costs a shard task: a flow of 16 tasks x 0.1 s on a pool of 2, with no
slot, with the project's device slots (a kernel file lock per device) and with a Prefect global
concurrency limit of 2 slots (the design they replaced), side by side.

    python benchmarks/bench_slots.py [--tasks 16] [--seconds 0.1]

Runs against the local Prefect server (started or reused). The no-slot run is the baseline."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.ops.server import ensure_server  # noqa: E402  (no prefect import: safe before the server is set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=0.1)
    args = parser.parse_args()
    ensure_server()
    import os

    os.environ["MUSIC_SLOT_DIR"] = tempfile.mkdtemp(prefix="bench-slots-")
    from prefect import flow, get_client, task
    from prefect.concurrency.sync import concurrency
    from prefect.task_runners import ThreadPoolTaskRunner

    from music_model.roles.slots import Slot, device_slot

    slots = [Slot("bench-0", "cpu"), Slot("bench-1", "cpu")]
    limit = "bench-slots-prefect"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(limit, 2)

    @task
    def work(kind: str, index: int) -> None:
        if kind == "device slot":
            with device_slot(slots, {"what": f"bench-{index}"}):
                time.sleep(args.seconds)
        elif kind == "Prefect limit":
            with concurrency(limit, occupy=1, strict=True):
                time.sleep(args.seconds)
        else:
            time.sleep(args.seconds)

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def probe(kind: str) -> float:
        start = time.perf_counter()
        for future in work.map(kind=kind, index=list(range(args.tasks))):
            future.result()
        return time.perf_counter() - start

    ideal = args.tasks * args.seconds / 2
    rows = [(kind, probe(kind)) for kind in ("no slot", "device slot", "Prefect limit")]
    base = rows[0][1]
    print(f"{args.tasks} tasks x {args.seconds} s on 2 threads (ideal {ideal:.2f} s)")
    print(f"{'':14s} {'seconds':>8} {'x no slot':>10} {'overhead/task s':>16}")
    for kind, seconds in rows:
        print(f"{kind:14s} {seconds:8.2f} {seconds / base:10.2f} {(seconds - base) * 2 / args.tasks:16.3f}")


if __name__ == "__main__":
    main()
