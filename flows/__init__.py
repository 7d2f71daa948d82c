"""The Prefect flows (`build`, `msic`, `evaluate`, `train`, `pipeline`) with their task runners and
run names; `flows.cli`, the `music` command line; `flows.ops`, the server and worker operations."""
import logging

from music_model.noise import drop_log

# Prefect logs two INFO lines around our on_running hook (flows/ops/monitor.py) in every flow run, in
# every process that runs flows (the CLI, a worker's flow runs): nothing to act on.
drop_log("prefect.engine", "'on_flow_running'", logging.INFO)
