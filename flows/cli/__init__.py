"""The `music` command line: `main.py` assembles one module per command group (`eval`, `model`,
`msic`, `plan`, `show`), which share `shared.py`; they and it import `shared`, and it imports none
of them, so the command modules form a tree with no circle."""
