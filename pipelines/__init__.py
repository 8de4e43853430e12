"""Prefect flows that drive the DVC graph in dvc.yaml."""
import os

# Without PREFECT_API_URL a flow starts Prefect's temporary local server, which must answer within this many seconds;
# Prefect's 20 s runs out on a machine busy with training (the first start also creates its database). A value set
# in the environment wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
