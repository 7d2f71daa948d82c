"""Prefect flows, the `music` command line and the local Prefect server."""
import logging

from music_model.noise import drop_log

# Prefect logs two INFO lines around our on_running hook (flows/monitor.py) in every flow run, in
# every process that runs flows (the CLI, a worker's flow runs): nothing to act on.
drop_log("prefect.engine", "'on_flow_running'", logging.INFO)
