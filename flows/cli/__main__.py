"""`python -m flows.cli`: the `music` command."""
from flows.cli.main import app

app()
