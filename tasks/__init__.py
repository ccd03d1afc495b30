"""Prefect tasks, one per pipeline stage, plus the config, store and cache they share.

Importing this package sets Prefect defaults this project relies on, before Prefect is imported:
no telemetry (the runs happen on closed networks), and a long start-up timeout for the embedded
server (on 2 cores a fresh database takes 15-30 s to migrate; the default 20 s fails).
"""

import os

for _name, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_name, _value)
