"""A throwaway PostgreSQL cluster from Debian's `postgresql` package on 127.0.0.1, for the
orchestration benchmark and tests/test_postgres.py: `initdb` into a folder of its own, `pg_ctl start`
on a free port, trust authentication for the superuser `prefect`, stopped and removed on exit.
PostgreSQL refuses to run as root, so under root the cluster is the package's `postgres` user's."""
from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL program of the newest installed server, else from PATH, else None."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    return found[-1]


class Cluster:
    def __init__(self, port: int):
        self.port = port

    def create_database(self, name: str) -> str:
        """An empty database `name` (non-word characters replaced); its SQLAlchemy URL for Prefect."""
        name = re.sub(r"\W", "_", name)[:60]
        subprocess.run([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "prefect", name],
                       check=True, capture_output=True)
        return f"postgresql+asyncpg://prefect@127.0.0.1:{self.port}/{name}"

    def count(self, database_url: str, query: str) -> int:
        """The integer a one-value query answers, through psql."""
        database = database_url.rsplit("/", 1)[1]
        done = subprocess.run([postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "prefect", "-tA",
                               database, "-c", query], check=True, capture_output=True, text=True)
        return int(done.stdout.strip())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_cluster() -> Iterator[Cluster]:
    if postgres_bin("initdb") is None:
        raise FileNotFoundError("no PostgreSQL server: install Debian's postgresql (tests/install_postgres.sh)")
    folder = Path(tempfile.mkdtemp(prefix="music-postgres-"))  # not pytest's: those are root's alone
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", _free_port()
    try:
        subprocess.run([*as_user, postgres_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "prefect"], check=True,
                       capture_output=True)
        subprocess.run([*as_user, postgres_bin("pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "start", "-o",
                        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"],
                       check=True, capture_output=True)
        yield Cluster(port)
    finally:
        if data.exists():
            subprocess.run([*as_user, postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
