"""The local Prefect server the CLI starts or reuses (never Prefect's ephemeral mode, which loses
task-run records): 127.0.0.1, analytics off, its database SQLite in the project's state folder
unless a database URL is given (`music server --database-url`, or Prefect's own
PREFECT_API_DATABASE_CONNECTION_URL in the environment): PostgreSQL for builds at scale.

The plain `prefect` CLI in a new shell knows nothing of it (its default profile runs a temporary
server of its own): `save_profile` writes a `music` Prefect profile naming this server's API URL,
which `prefect profile use music` makes the CLI's default."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from music_model.paths import state_dir
from safe_files import write_text

DEFAULT_PORT = 4200
PROFILE = "music"


def prefect_home() -> Path:
    return state_dir() / "prefect"


def _record() -> Path:
    return prefect_home() / "server.json"


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return sock.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port on 127.0.0.1")


def _use(api_url: str) -> str:
    os.environ["PREFECT_API_URL"] = api_url
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return api_url


def running_server() -> dict | None:
    """The server this state folder started, when it is still up."""
    try:
        record = json.loads(_record().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if healthy(record["api_url"]) else None


DATABASE_SETTING = "PREFECT_API_DATABASE_CONNECTION_URL"


def database_url(given: str | None = None) -> str | None:
    """The server's database: the URL given, else Prefect's own setting, else None (SQLite in the state folder)."""
    return given or os.environ.get(DATABASE_SETTING) or None


def shown_database(url: str | None) -> str:
    """The database as records and messages show it: a URL without its password."""
    if url is None:
        return f"sqlite ({prefect_home() / 'prefect.db'})"
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def spawn_server(port: int = DEFAULT_PORT, database: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start `prefect server start` in the background (not waiting for it) on `database` (a
    SQLAlchemy URL, e.g. postgresql+asyncpg://user:password@host:5432/prefect; None: SQLite in the
    state folder); returns it and its API URL."""
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port(port)
    api_url = f"http://127.0.0.1:{port}/api"
    # The UI asks the API at PREFECT_UI_API_URL, which otherwise defaults to port 4200 whatever --port says.
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": api_url}
    env.pop("PREFECT_API_URL", None)
    env.pop(DATABASE_SETTING, None)
    if database:
        env[DATABASE_SETTING] = database
    with open(home / "server.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    record = {"pid": process.pid, "port": port, "api_url": api_url, "ui_url": ui_url(api_url), "database": shown_database(database)}
    write_text(_record(), json.dumps(record), mode=0o600)  # owner-only, as Prefect's profiles file
    return process, api_url


def wait_healthy(process: subprocess.Popen, api_url: str, timeout: float = 90.0) -> None:
    log = prefect_home() / "server.log"
    deadline = time.monotonic() + timeout
    while not healthy(api_url):
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            process.terminate()
            raise RuntimeError(f"prefect server not healthy after {timeout:.0f}s; see {log}")
        time.sleep(0.5)


def ensure_server(port: int = DEFAULT_PORT, timeout: float = 90.0, database: str | None = None) -> str:
    """The API URL of a healthy server: `$PREFECT_API_URL` if set, else ours, started if needed on
    `database_url(database)`; a running one on another database than one asked for is an error.

    Points this process's Prefect client at it: call it before importing prefect, which reads its
    settings at import time."""
    if os.environ.get("PREFECT_API_URL"):
        url = os.environ["PREFECT_API_URL"]
        if not healthy(url, timeout=5):
            raise RuntimeError(f"PREFECT_API_URL={url} does not answer at /health")
        return _use(url)
    database = database_url(database)
    if record := running_server():
        running = record.get("database", shown_database(None))
        if database and running != shown_database(database):
            raise RuntimeError(f"the server of this state folder ({record['api_url']}) runs on {running}, not "
                               f"{shown_database(database)}: `music server stop` first")
        return _use(record["api_url"])
    process, api_url = spawn_server(port, database)
    wait_healthy(process, api_url, timeout)
    return _use(api_url)


def stop_server(timeout: float = 30.0) -> bool:
    """SIGTERM the server this state folder started; True when one was stopped."""
    try:
        record = json.loads(_record().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    try:
        os.killpg(record["pid"], signal.SIGTERM)
    except ProcessLookupError:
        _record().unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    _record().unlink(missing_ok=True)
    return True


def save_profile(api_url: str) -> tuple[Path, str | None]:
    """Create or update the `music` profile (PREFECT_API_URL = `api_url`) in the profiles file the
    `prefect` CLI reads ($PREFECT_PROFILES_PATH, default ~/.prefect/profiles.toml), as `prefect
    profile create` + `prefect config set` would. The active profile is left alone: switching the
    user's Prefect to our server is their call (`prefect profile use music`). Returns the file and
    the active profile's name."""
    import toml
    from prefect.settings import PREFECT_API_URL, get_current_settings, load_profiles
    from prefect.settings.profiles import DEFAULT_PROFILES_PATH

    profiles = load_profiles()
    profiles.update_profile(PROFILE, {PREFECT_API_URL: api_url})
    path = get_current_settings().profiles_path
    # What prefect.settings.save_profiles writes (the user's profiles, not Prefect's built-in ones), atomically.
    write_text(path, mode=0o600, text=toml.dumps(profiles.without_profile_source(DEFAULT_PROFILES_PATH).to_dict()))
    return path, os.environ.get("PREFECT_PROFILE") or profiles.active_name


def ui_url(api_url: str) -> str:
    return api_url.removesuffix("/api")
