"""Usage statistics and telemetry of Ray, MLflow and DVC are off unless the user opts in.

The same variables go into Ray workers' runtime_env (see `TELEMETRY_OFF`), because a worker
process on a cluster node does not inherit this process's environment.
"""

import os

TELEMETRY_OFF = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
}


def disable_telemetry() -> None:
    # setdefault: a user who explicitly opted in keeps their choice.
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
