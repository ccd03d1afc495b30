"""The speedrun flow (flows/speedrun.py). Importing `tasks` first applies the project's Prefect defaults."""

import tasks  # noqa: F401  (sets Prefect environment defaults before prefect is imported)
