"""Every `MUSIC_*` environment variable the project reads, with its default: the one module that
reads them (`tests/test_settings.py` checks no other does; the README's table lists them all).
Each is read when asked for, not at import, so a process that sets one before a call sees it."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    help: str

    def get(self) -> str:
        """The variable's value, or its default when it is unset or empty."""
        return os.environ.get(self.name) or self.default

    def number(self) -> float:
        return float(self.get())

    def flag(self) -> bool:
        return self.get() not in ("", "0")


HOME = Setting("MUSIC_HOME", "~/.cache/music", "state: the zoo, the local Prefect server's database and logs")
ZOO_DIR = Setting("MUSIC_ZOO_DIR", "", "the tiny zoo's folder (empty: `<MUSIC_HOME>/zoo`)")
SLOT_DIR = Setting("MUSIC_SLOT_DIR", "", "the device slots' lock folder, one a machine (empty: `<tmp>/music-slots`)")
VERBOSE = Setting("MUSIC_VERBOSE", "", "1: keep the library warnings and progress bars known to be harmless (`music --verbose`)")
RUNNER = Setting("MUSIC_RUNNER", "local", "where a deployment run's shard tasks run: local or ray")
RAY_ADDRESS = Setting("MUSIC_RAY_ADDRESS", "", "with `MUSIC_RUNNER=ray`: the running cluster's GCS address, e.g. `127.0.0.1:6379` (required)")
RAY_GPUS_PER_SHARD = Setting("MUSIC_RAY_GPUS_PER_SHARD", "1", "GPUs each Ray shard actor takes (fractions share a GPU)")
HEARTBEAT_SECONDS = Setting("MUSIC_HEARTBEAT_SECONDS", "30", "how often a flow run tells the server it is alive")
SERVER_PROBE_SECONDS = Setting("MUSIC_SERVER_PROBE_SECONDS", "2", "how often a flow run checks that its Prefect server answers")
DRIVER_DIR = Setting("MUSIC_DRIVER_DIR", "", "set by the Ray runner: the driver's folder, which Ray workers run in")
ALERT_WEBHOOK = Setting("MUSIC_ALERT_WEBHOOK", "", "`music deploy`: a webhook URL the release and failure alerts are POSTed to (saved as a Custom Webhook block)")
ALERT_BLOCK = Setting("MUSIC_ALERT_BLOCK", "", "`music deploy`: a saved Prefect notification block (`<type-slug>/<name>`, e.g. `slack-webhook/team`) for the alerts")
ALERT_LATE_HOURS = Setting("MUSIC_ALERT_LATE_HOURS", "12", "`music deploy`: alert when a rebuild has run this long without completing")

SETTINGS: tuple[Setting, ...] = (HOME, ZOO_DIR, SLOT_DIR, VERBOSE, RUNNER, RAY_ADDRESS, RAY_GPUS_PER_SHARD, HEARTBEAT_SECONDS,
                                 SERVER_PROBE_SECONDS, DRIVER_DIR, ALERT_WEBHOOK, ALERT_BLOCK, ALERT_LATE_HOURS)
