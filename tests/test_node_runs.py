"""How the node runs of a multi-node stage end when node 0 stops, against a real Prefect server.

When node 0's stage stops (cancelled from the UI, or failed), it moves every unfinished node run to Cancelling,
and each node run stops its own ranks once it sees node 0's run ending. Both happen at once, so two races matter:

- A node run that ends Failed between node 0's poll and its cancel must stay Failed: Cancelling forced over a
  final state is never finished by anyone (the worker's runner has no process left to cancel).
- A node run that node 0 moved to Cancelling while its ranks were stopping must end Cancelled. The server rejects
  any other end of a Cancelling run, so a node run that raises would stay Cancelling for good (CI saw exactly
  this: `still Cancelling after 120s`).

The second test runs the node's real flow (flows/torchrun_node.py) and a real torchrun agent, which waits at a
rendezvous that node 0 never hosts until the node run stops it.
"""

import threading
import time

from prefect import flow


@flow(name="speedrun-test-node0")
def node0_stand_in() -> None:
    """Only its flow runs are used: they stand for node 0's run, whose state the node runs watch."""


def node_runs_for(run_id, log, kind=None):
    """Node 0's NodeRuns (or a subclass `kind`) holding one node run, node 1's."""
    from tasks.nodes import NodeRuns

    runs = (kind or NodeRuns)("pretrain", {"queues": ["node-1"]}, log)
    runs.ids[1] = str(run_id)
    return runs


def test_a_node_run_that_fails_just_before_node0_cancels_it_stays_failed(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.states import Failed, Running

    from tasks.nodes import NodeRuns

    logged = []
    with get_client(sync_client=True) as client:
        node1 = client.create_flow_run(node0_stand_in, state=Running())

        class NodeFinishesAfterThePoll(NodeRuns):
            def poll(self, force: bool = False):
                states = super().poll(force)
                client.set_flow_run_state(node1.id, Failed(message="its ranks failed"))
                return states

        node_runs_for(node1.id, logged.append, NodeFinishesAfterThePoll).cancel_unfinished("node 0 of pretrain stopped")
        state = client.read_flow_run(node1.id).state
    assert state.type.value == "FAILED" and state.message == "its ranks failed", state
    assert any("node 1" in line and "Failed" in line for line in logged), logged


def test_a_running_node_run_that_node0_cancels_is_cancelling(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    logged = []
    with get_client(sync_client=True) as client:
        node1 = client.create_flow_run(node0_stand_in, state=Running())
        node_runs_for(node1.id, logged.append).cancel_unfinished("node 0 of pretrain stopped")
        state = client.read_flow_run(node1.id).state
    assert state.type.value == "CANCELLING" and "node 0 of pretrain stopped" in state.message, state
    assert any(f"cancelled its run {node1.id}" in line for line in logged), logged


def test_a_node_run_that_node0_cancels_while_its_ranks_stop_ends_cancelled(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.states import Cancelling, Running

    from flows.torchrun_node import torchrun_node
    from tasks.nodes import NODES, trainer_code
    from tasks.store import atomic_write_json
    from tests.test_deployment_e2e import free_port

    work = tmp_path / "work"
    (work / NODES).mkdir(parents=True)
    atomic_write_json(work / NODES / "launch.json", {"nonce": "n1", "code": trainer_code()})
    with get_client(sync_client=True) as client:
        node0 = client.create_flow_run(node0_stand_in, state=Running())
        launch = {"module": "model.train", "args": [], "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}",
                  "rdzv_timeout_s": 120, "work": str(work), "nonce": "n1", "parent_flow_run": str(node0.id),
                  "torchrun": {}}
        ended = {}
        name = f"pretrain-node1-{tmp_path.name}"
        node = threading.Thread(target=lambda: ended.update(
            state=torchrun_node.with_options(flow_run_name=name)("pretrain", 1, launch, return_state=True)))
        node.start()
        deadline = time.monotonic() + 120
        while not (work / NODES / "probe-1.json").exists() or not (work / NODES / "node-1.log").exists():
            assert node.is_alive() and time.monotonic() < deadline, ended
            time.sleep(0.2)
        [node1] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        # node 0 stops: its stage cancels the node run, and its own run is being cancelled, which the node watches
        node_runs_for(node1.id, print).cancel_unfinished("node 0 of pretrain stopped")
        client.set_flow_run_state(node0.id, Cancelling())
        node.join(timeout=120)
        assert not node.is_alive(), "the node run did not stop its ranks within 120 s of node 0 being cancelled"
        final = client.read_flow_run(node1.id).state
    assert ended["state"].is_cancelled() and final.type.value == "CANCELLED", (ended["state"], final)
    assert "cancelled by node 0 (node 0 of pretrain stopped)" in final.message, final.message
