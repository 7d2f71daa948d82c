"""Server and worker operations: the local Prefect server (`server.py`), deployments and workers
(`deploy.py`), and how a flow run ends when its process, server or operator stops it (`monitor.py`)."""
