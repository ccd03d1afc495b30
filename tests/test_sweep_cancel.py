"""A sweep on the pool that stops waiting (cancelled, crashed) cancels the cells it submitted, against a real server:
a cell that ended just before keeps its end, and a cell no worker has started goes straight to Cancelled. Forcing
Cancelling over either would leave it Cancelling for good: no process is there for a worker to cancel."""

import signal

from prefect import flow


@flow(name="speedrun-test-cell")
def cell_stand_in(n: int = 0) -> None:
    """Only its deployment is used: the cells' runs stay Scheduled (no worker), as on a busy pool."""


class SweepStopped(Exception):
    """Raised in the sweep's wait, as a cancellation's signal would."""


def test_a_sweep_that_stops_waiting_cancels_its_cells_and_keeps_a_cell_that_just_ended(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.states import Failed

    from flows.sweep import run_cells_on_pool

    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(flow_id=client.create_flow(cell_stand_in), name="cell")

    def cells(client) -> dict[int, object]:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        return {run.parameters["n"]: run for run in runs}

    seen_both = []

    def stop(signum, frame):
        with get_client(sync_client=True) as client:
            submitted = cells(client)
            # Raise only a tick after both cells exist: by then the sweep is in its wait (POLL_S sleeps), not
            # between its last submission and the try that cancels on the way out.
            if len(submitted) < 2 or not seen_both:
                if len(submitted) == 2:
                    seen_both.append(True)
                signal.setitimer(signal.ITIMER_REAL, 0.5)
                return
            client.set_flow_run_state(submitted[0].id, Failed(message="cell 0 failed"))  # ended since the last poll
        raise SweepStopped("the sweep's flow run is being cancelled")

    @flow(name="speedrun-test-sweep")
    def sweep():
        return run_cells_on_pool({"a": {"n": 0}, "b": {"n": 1}}, "speedrun-test-cell/cell")

    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        state = sweep(return_state=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert state.is_failed() and "being cancelled" in state.message, state
    with get_client(sync_client=True) as client:
        ended = {n: run.state for n, run in cells(client).items()}
    assert ended[0].type.value == "FAILED" and ended[0].message == "cell 0 failed", ended[0]
    assert ended[1].type.value == "CANCELLED", ended[1]
