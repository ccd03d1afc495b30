"""Shared test set-up: an isolated Prefect home and server, and the real data in ../shared/data."""

import os
import tempfile
from pathlib import Path

# Before anything imports prefect: a throwaway PREFECT_HOME so tests never touch ~/.prefect,
# and the project's Prefect defaults (tasks/__init__.py).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="speedrun-test-prefect-"))
os.environ.setdefault("WANDB_MODE", "offline")
# The suite runs on two xdist workers (pyproject addopts), each with torch processes of their own. OpenMP threads
# that spin while they wait take the cores from the other worker's processes; threads that sleep leave them.
# Measured on 2 cores, two processes each running small 2-thread ops at once: 3.1 s each spinning, 0.63 s
# sleeping (0.35 s for one alone); with spinning threads the whole suite ran slower on two workers than on one.
# It changes no result: the thread count, and so the float order, stays as it was. Every process the tests start
# inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import tasks  # noqa: E402,F401

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "pretrain").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the tests read ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (own SQLite DB) for every in-process flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread is far faster than two spinning OpenMP threads."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# The test files that take minutes, longest first. The suite runs on two xdist workers, a file at a time each
# (pyproject addopts): these start first, and the short files fill in around them, instead of one long file
# running alone at the end while the other worker idles.
LONG_FILES = ("test_deployment_e2e.py", "test_flow_cli.py", "test_flow.py", "test_sweeps.py", "test_multinode.py")


def pytest_collection_modifyitems(items):
    first = {name: rank for rank, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(LONG_FILES)))  # stable: the rest keep their order
