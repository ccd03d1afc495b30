"""One training run over several nodes (runtime.nnodes > 1): node 0 runs the stage, the pool starts the others.

A multi-node run is N torchruns, one per node, joined by torch.distributed's c10d rendezvous at
runtime.rdzv_endpoint, which node 0's torchrun hosts. The flow runs on node 0. Its pretrain or sft stage:

1. writes `work/nodes/launch.json`: a nonce for this attempt and the sha256 of every model/ and ops/ file;
2. submits one run of runtime.node_deployment (speedrun/torchrun-node, flows/torchrun_node.py) per other node,
   to that node's work queue (runtime.node_queues: the worker on each node polls its own queue);
3. waits for every node's probe: a node run reads launch.json (so it sees what node 0 wrote), checks that it runs
   the same model code, and writes `work/nodes/probe-<rank>.json` with the nonce (so node 0 sees what it wrote).
   A store that is not shared, a node whose checkout differs, or a queue no worker serves fails the stage here,
   before any rank starts, with an error naming the node and the fix;
4. runs node 0's torchrun while watching the node runs: a node run that fails stops node 0's ranks and fails the
   stage with that node's last log lines; when node 0 fails (or is cancelled) the node runs are cancelled;
5. after node 0's ranks finish, waits for every node run to complete.

Only node 0 takes the stage's lock and commits the artifact. Every rank writes its own checkpoint files (optimizer
and loader state, model/checkpoint.py) into the one checkpoint directory of the shared store, so a retry resumes
every node from the last complete checkpoint. A node run also stops its ranks when node 0's flow run ends
(cancelled, crashed), and ranks whose peer died fail on their next collective, or give up at the rendezvous
after runtime.rdzv_timeout_s: no node waits forever.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

from tasks.launch import TorchrunError, run_torchrun
from tasks.store import PROJECT_ROOT, atomic_write_json

NODES = "nodes"  # the folder of work/ that the nodes of one run share: launch.json, probes, node logs
NODE_ENV = "SPEEDRUN_NODE"  # on a node's worker: its own work queue (README "Multi-node")
POLL_S = 2.0
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class NodeError(TorchrunError):
    """A node of a multi-node run could not start, failed, or did not finish; the message names the node."""


def node_options(cfg) -> dict | None:
    """How a training stage spreads over nodes (None on one node): the queues of the other nodes, in rank order,
    the deployment that runs them, the rendezvous address and the timeout. Not part of any key; the key's
    world size (tasks/environment.py) is nnodes x nproc_per_node."""
    runtime = cfg.runtime
    if runtime.nnodes == 1:
        return None
    return {"nnodes": runtime.nnodes, "queues": other_queues(runtime.work_queues, runtime.nnodes),
            "deployment": runtime.node_deployment, "rdzv_endpoint": runtime.rdzv_endpoint,
            "rdzv_timeout_s": runtime.rdzv_timeout_s}


def other_queues(queues: list[str], nnodes: int, here: str | None = None) -> list[str]:
    """The work queues of nodes 1..nnodes-1: the listed queues other than this node's own ($SPEEDRUN_NODE, set
    on each node's worker; unset = the first listed), in order."""
    here = (os.environ.get(NODE_ENV) if here is None else here) or queues[0]
    return [q for q in queues if q != here][:nnodes - 1]


def check_multinode(runtime) -> None:
    """Before any stage runs: a multi-node run needs a Prefect server that every node's worker reaches (not the
    embedded one), the node deployment on it, and each node's work queue in its pool. Raises ConfigError naming
    the fix."""
    from tasks.config import ConfigError

    if runtime.nnodes == 1:
        return
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConfigError([f"runtime.nnodes={runtime.nnodes} needs a Prefect server that the workers of all nodes "
                           "reach; fix: start one (prefect server start) and set PREFECT_API_URL on every node"])
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_deployment_by_name(runtime.node_deployment).work_pool_name
        except ObjectNotFound:
            raise ConfigError([f"runtime.node_deployment: no deployment {runtime.node_deployment!r} on the server; "
                               "fix: prefect deploy --name torchrun-node (prefect.yaml)"]) from None
        missing = []
        for queue in other_queues(runtime.work_queues, runtime.nnodes):
            try:
                client.read_work_queue_by_name(queue, work_pool_name=pool)
            except ObjectNotFound:
                missing.append(queue)
    if missing:  # a worker started on a missing queue polls nothing, and a run sent there would wait forever
        raise ConfigError([f"runtime.node_queues: the pool {pool!r} has no work queue {q!r}; fix: prefect work-queue "
                           f"create {q} --pool {pool}, and start that node's worker with --work-queue {q}"
                           for q in missing])


def trainer_code() -> dict[str, str]:
    """sha256 of every file the ranks run (model/ and ops/), by path: the nodes must run the same code."""
    return {str(path.relative_to(PROJECT_ROOT)): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in ("model", "ops") for path in sorted((PROJECT_ROOT / folder).rglob("*.py"))}


def with_port(endpoint: str | None) -> str:
    """`host:port` as given, or `host` (default: this machine's name) with a port that is free here (node 0, which
    hosts the rendezvous)."""
    endpoint = endpoint or socket.getfqdn()
    if ":" in endpoint:
        return endpoint
    with socket.socket() as s:
        s.bind(("", 0))
        return f"{endpoint}:{s.getsockname()[1]}"


def rdzv_conf(is_host: bool, timeout_s: float) -> str:
    # is_host: node 0 hosts the rendezvous store even where the address does not look like this machine's
    # (a load balancer, a second name); the others never try to. join_timeout: how long a node waits for the rest.
    return f"is_host={int(is_host)},join_timeout={int(timeout_s)}"


# ------------------------------------------------------------------------------------------------ node 0

def run_multinode(stage: str, module: str, args: list[str], *, work: Path, log_path: Path, nodes: dict,
                  torchrun: dict, log) -> None:
    """Node 0 of a multi-node training run (steps 1-5 of the module docstring). Raises NodeError or
    TorchrunError; in either case no node run is left running."""
    from prefect.runtime import flow_run

    shared = work / NODES
    shared.mkdir(parents=True, exist_ok=True)
    for old in shared.glob("probe-*.json"):
        old.unlink()
    endpoint = with_port(nodes["rdzv_endpoint"])
    nonce = uuid.uuid4().hex
    atomic_write_json(shared / "launch.json", {"nonce": nonce, "code": trainer_code(), "host": socket.gethostname(),
                                               "rdzv_endpoint": endpoint, "time": time.time()})
    launch = {"module": module, "args": args, "nnodes": nodes["nnodes"], "rdzv_endpoint": endpoint,
              "rdzv_timeout_s": nodes["rdzv_timeout_s"], "work": str(work), "nonce": nonce,
              "parent_flow_run": str(flow_run.id) if flow_run.id else None,
              "torchrun": {k: v for k, v in torchrun.items() if k != "flow_deadline"}}
    runs = NodeRuns(stage, nodes, log)
    try:
        runs.submit(launch, name=f"{flow_run.name or 'speedrun'}-{stage}", env=run_environment(flow_run.id))
        runs.wait_for_probes(shared, nonce, nodes["rdzv_timeout_s"])
        try:
            run_torchrun(module, args, log_path=log_path, log=log, nnodes=nodes["nnodes"], node_rank=0,
                         rdzv_endpoint=endpoint, rdzv_conf=rdzv_conf(True, nodes["rdzv_timeout_s"]),
                         watch=runs.failure, **torchrun)
        except TorchrunError as exc:
            # A node that died takes node 0's ranks down with it: say which node, if its run says so in time
            # (when the watch stopped node 0, the message says so already).
            failure = runs.failure(wait_s=15.0)
            if failure is None or failure in str(exc):
                raise
            raise NodeError(f"{failure}\nnode 0: {exc}") from None
        runs.wait_completed(nodes["rdzv_timeout_s"])
    finally:
        runs.cancel_unfinished(f"node 0 of {stage} stopped")


class NodeRuns:
    """The runs of runtime.node_deployment that hold nodes 1..N-1 of one stage attempt."""

    def __init__(self, stage: str, nodes: dict, log):
        self.stage, self.nodes, self.log = stage, nodes, log
        self.ids: dict[int, str] = {}  # node rank -> flow run id
        self.final: dict[int, object] = {}  # node rank -> its final state
        self._polled = 0.0

    def submit(self, launch: dict, name: str, env: dict) -> None:
        from prefect.deployments import run_deployment

        for rank, queue in enumerate(self.nodes["queues"], start=1):
            run = run_deployment(self.nodes["deployment"], parameters={"stage": self.stage, "node_rank": rank,
                                                                       "launch": launch},
                                 flow_run_name=f"{name}-node{rank}", work_queue_name=queue, timeout=0,
                                 tags=["speedrun", "node", f"node:{rank}"],
                                 job_variables={"env": env} if env else None)
            self.ids[rank] = str(run.id)
            self.log(f"node {rank}: flow run {run.id} of {self.nodes['deployment']} on work queue {queue!r}")

    def _describe(self, rank: int) -> str:
        return f"node {rank} (work queue {self.nodes['queues'][rank - 1]!r}, flow run {self.ids[rank]})"

    def poll(self, force: bool = False) -> dict[int, object]:
        """Every node run's current state (read at most every POLL_S unless forced); final ones are kept."""
        from prefect.client.orchestration import get_client

        states = {}
        if not force and time.monotonic() - self._polled < POLL_S:
            return states
        self._polled = time.monotonic()
        with get_client(sync_client=True) as client:
            for rank, run_id in self.ids.items():
                state = self.final.get(rank) or client.read_flow_run(run_id).state
                if state is not None and state.type.value in FINAL_STATES:
                    self.final[rank] = state
                states[rank] = state
        return states

    def failure(self, wait_s: float = 0.0) -> str | None:
        """The first node run that ended without completing, as a sentence with its message (its last log lines);
        None while all are running or completed. With `wait_s`, keep looking that long."""
        deadline = time.monotonic() + wait_s
        while True:
            self.poll(force=wait_s > 0)
            for rank, state in sorted(self.final.items()):
                if not state.is_completed():
                    return f"{self._describe(rank)} ended {state.name}: {state.message}"
            if time.monotonic() >= deadline or len(self.final) == len(self.ids):
                return None
            time.sleep(POLL_S)

    def wait_for_probes(self, shared: Path, nonce: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = set(self.ids)
        while waiting:
            for rank in sorted(waiting):
                probe = _read_json(shared / f"probe-{rank}.json")
                if probe and probe.get("nonce") == nonce:
                    self.log(f"node {rank}: on {probe.get('host')}, sees the shared store and runs the same code")
                    waiting.discard(rank)
            if failure := self.failure():
                raise NodeError(f"{failure}")
            if waiting and time.monotonic() > deadline:
                states = self.poll(force=True)
                rank = min(waiting)
                state = states.get(rank)
                if state is not None and state.type.value in ("SCHEDULED", "PENDING"):
                    why = (f"no worker took it within {timeout_s:g} s (runtime.rdzv_timeout_s); fix: on that node, "
                           f"start `prefect worker start --pool <pool> --work-queue {self.nodes['queues'][rank - 1]}` "
                           f"with {NODE_ENV}={self.nodes['queues'][rank - 1]}, and check it has a free slot")
                else:
                    why = (f"it started ({state.name if state else 'no state'}) but wrote no probe to {shared} within "
                           f"{timeout_s:g} s: multi-node needs a store that every node reads and writes at the same "
                           "path (runtime.store on a shared filesystem)")
                raise NodeError(f"{self._describe(rank)}: {why}")
            if waiting:
                time.sleep(POLL_S)

    def wait_completed(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.final) < len(self.ids):
            if failure := self.failure():
                raise NodeError(failure)
            if time.monotonic() > deadline:
                rank = min(set(self.ids) - set(self.final))
                raise NodeError(f"{self._describe(rank)} had not finished {timeout_s:g} s after node 0's ranks did")
            time.sleep(POLL_S)
            self.poll(force=True)
        if failure := self.failure():
            raise NodeError(failure)

    def cancel_unfinished(self, reason: str) -> None:
        if not self.ids:
            return
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.responses import SetStateStatus
        from prefect.states import Cancelling

        try:
            self.poll(force=True)
            with get_client(sync_client=True) as client:
                for rank, run_id in self.ids.items():
                    if rank in self.final:
                        continue
                    # Not forced: a node run that ended since the poll keeps its end. Cancelling forced over a
                    # final state is never finished (no process is left for the worker to cancel).
                    result = client.set_flow_run_state(run_id, Cancelling(message=reason))
                    if result.status == SetStateStatus.ACCEPT:
                        self.log(f"node {rank}: cancelled its run {run_id} ({reason})")
                    else:
                        state = client.read_flow_run(run_id).state
                        self.log(f"node {rank}: its run {run_id} had already ended "
                                 f"({state.name if state else 'no state'}: {state.message if state else ''})")
        except Exception as exc:  # the stage's own error is the one to report; the nodes time out regardless
            self.log(f"could not cancel the node runs ({exc}); their ranks stop within runtime.rdzv_timeout_s")


def run_environment(flow_run_id) -> dict:
    """The `env` job variable of node 0's flow run (e.g. NCCL_SOCKET_IFNAME set with `--job-variable`): the node
    runs get it too, so a run's network settings are given once. A worker's own environment applies as well."""
    if not flow_run_id:
        return {}
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        variables = client.read_flow_run(flow_run_id).job_variables or {}
    return dict(variables.get("env") or {})


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------------ nodes 1..N-1

def run_node(stage: str, node_rank: int, launch: dict, log) -> None:
    """Node `node_rank` of a multi-node run (flows/torchrun_node.py): check the shared store and the code, write
    the probe, run this node's torchrun. Stops its ranks when node 0's flow run ends."""
    shared = Path(launch["work"]) / NODES
    host = socket.gethostname()
    found = _read_json(shared / "launch.json")
    if found is None or found.get("nonce") != launch["nonce"]:
        seen = "an older launch" if found else "nothing"
        raise NodeError(f"node {node_rank} ({host}) finds {seen} at {shared / 'launch.json'}, which node 0 just wrote: "
                        "multi-node needs a store that every node reads and writes at the same path; fix: put "
                        "runtime.store (SPEEDRUN_HOME) on a filesystem every node mounts there (README: Multi-node)")
    mine = trainer_code()
    differ = sorted(p for p in set(mine) | set(found["code"]) if mine.get(p) != found["code"].get(p))
    if differ:
        raise NodeError(f"node {node_rank} ({host}) runs other model code than node 0 ({', '.join(differ[:5])}"
                        f"{' ...' if len(differ) > 5 else ''} differ); fix: check out the same commit on every node")
    atomic_write_json(shared / f"probe-{node_rank}.json", {"nonce": launch["nonce"], "host": host, "pid": os.getpid()})
    log(f"node {node_rank} on {host}: joining the rendezvous at {launch['rdzv_endpoint']}")
    run_torchrun(launch["module"], launch["args"], log_path=shared / f"node-{node_rank}.log", log=log,
                 nnodes=launch["nnodes"], node_rank=node_rank, rdzv_endpoint=launch["rdzv_endpoint"],
                 rdzv_conf=rdzv_conf(False, launch["rdzv_timeout_s"]), watch=_parent_watch(launch["parent_flow_run"]),
                 **launch["torchrun"])


def stopped_by_node0(launch: dict) -> str | None:
    """Why this node run ends Cancelled rather than Failed, or None when its own failure is the news.

    A node run whose ranks stopped because node 0's stage stopped is cancelled, not failed: node 0 moved it to
    Cancelling (and then the server accepts no other end: a Failed proposal is rejected and the run would stay
    Cancelling for good), or node 0's run is ending, which stopped these ranks or failed their collectives."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    try:
        with get_client(sync_client=True) as client:
            own = client.read_flow_run(flow_run.id).state if flow_run.id else None
            parent_id = launch.get("parent_flow_run")
            parent = client.read_flow_run(parent_id).state if parent_id else None
    except Exception:  # no server to ask: report the node's own error
        return None
    if own is not None and own.type.value == "CANCELLING":
        return f"cancelled by node 0 ({own.message})"
    if parent is not None and parent.type.value in ("CANCELLING", "CANCELLED", "FAILED", "CRASHED"):
        return f"node 0's flow run {parent_id} is {parent.name}"
    return None


def _parent_watch(parent_id: str | None):
    """A run_torchrun watch: a reason to stop once node 0's flow run has ended or is being cancelled."""
    if not parent_id:
        return None
    from prefect.client.orchestration import get_client

    polled = [0.0]

    def watch() -> str | None:
        if time.monotonic() - polled[0] < POLL_S:
            return None
        polled[0] = time.monotonic()
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(parent_id).state
        except Exception:  # a server hiccup is no reason to stop training
            return None
        if state is not None and (state.type.value in FINAL_STATES or state.type.value == "CANCELLING"):
            return f"node 0's flow run {parent_id} is {state.name}"
        return None

    return watch
