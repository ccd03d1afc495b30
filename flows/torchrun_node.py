"""One node's share of a multi-node training run: the deployment speedrun/torchrun-node (README "Multi-node").

Not started by hand: the pretrain or sft stage on node 0 submits one run of it per other node, each to that node's
work queue, with everything the node needs in `launch` (tasks/nodes.py says what and why). The run checks that
this node sees node 0's files in the shared store and runs the same model code, then runs this node's torchrun
(`--nnodes=N --node-rank=<node_rank> --rdzv-backend=c10d --rdzv-endpoint=<node 0>`) until the ranks finish, fail,
or node 0's flow run ends. Its log is the Prefect run's log and `work/nodes/node-<rank>.log` in the store.

A run whose ranks stopped because node 0's stage stopped ends Cancelled; one whose own ranks failed ends Failed.
"""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger
from prefect.states import Cancelled

from tasks.nodes import run_node, stopped_by_node0


@flow(name="speedrun", flow_run_name="{stage}-node{node_rank}", log_prints=True)  # deployed as speedrun/torchrun-node
def torchrun_node(stage: str, node_rank: int, launch: dict):
    logger = get_run_logger()
    try:
        run_node(stage, node_rank, launch, log=logger.info)
    except Exception as exc:
        if (why := stopped_by_node0(launch)) is None:
            raise
        logger.warning(str(exc))
        return Cancelled(message=f"node {node_rank} stopped: {why}; {str(exc).splitlines()[0]}")
