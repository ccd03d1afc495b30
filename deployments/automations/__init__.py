"""Prefect automations for the speedrun deployments (alerts on failed runs)."""
