"""One pretraining run over two nodes, through a real Prefect server, with this machine standing in for both.

Set up as README "Multi-node" says: the pool `speedrun`, the deployment speedrun/torchrun-node, a worker for node 1
polling its own work queue (`--work-queue node-1`, SPEEDRUN_NODE=node-1), one store that both nodes see, and the
flow started on node 0 with `runtime.nnodes=2`. Gloo on 127.0.0.1, one rank per node.

- Node 1's torchrun is SIGKILLed mid-run: the stage fails on both sides well within the rendezvous timeout,
  and the error names node 1.
- Running the flow again (the retry) resumes from the last complete checkpoint on both nodes and completes.
- The final weights equal those of the same run on one node with two ranks (`nproc_per_node=2`) within 1e-5.
- `prefect deployment run speedrun/smoke` with two nodes, cancelled mid-training: both flow runs end Cancelled
  and every rank on both nodes exits.
- A missing node queue or node deployment fails the run before any stage, naming the fix.

And without a server: a node that does not see node 0's files (no shared store) or runs other model code fails
before starting any rank, saying so; the queue each node rank goes to; a multi-node config without a server.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.store import WORK
from tests.test_flow_cli import trainer_pids
from tests.test_deployment_e2e import (FINAL_STATES, REPO_ROOT, background, free_port, git, prefect, run_deployment,
                                       wait_final, wait_healthy)

STEPS = 16
SAVE_EVERY = 4
SETS = {"pretrain.num_iterations": STEPS, "pretrain.save_every": SAVE_EVERY, "pretrain.eval_every": 8,
        "pretrain.eval_tokens": 2048, "runtime.omp_num_threads": 1,
        "sft.total_batch_size": 4096}  # world size 2: SFT's batch must still divide (validated even with --until pretrain)
RDZV_TIMEOUT_S = 60
TWO_NODES = {"runtime.nnodes": 2, "runtime.rdzv_endpoint": "127.0.0.1", "runtime.rdzv_timeout_s": RDZV_TIMEOUT_S}
PRETRAIN_WORK = f"stages/pretrain/*/{WORK}"  # the pretrain artifacts' work/ in the store


def speedrun_cli(sets: dict, store: Path, mirror: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "flows.speedrun", "--preset", "smoke", "--mirror", str(mirror), "--store",
            str(store), "--until", "pretrain", *extra]
    return args + [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def torchrun_agents(node_rank: int) -> list[int]:
    """The pids of torchrun agents started for node `node_rank` of a multi-node run."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, PermissionError, NotADirectoryError):
            continue
        if b"torch.distributed.run" in cmdline and f"--node-rank={node_rank}".encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def final_model(store: Path) -> Path:
    [model] = store.glob(f"stages/pretrain/*/checkpoint/model_{STEPS:06d}.pt")
    return model


@dataclass
class Cluster:
    repo: Path
    store: Path
    env: dict  # node 0's shell: PREFECT_API_URL, SPEEDRUN_NODE=node-0
    logs: dict[str, Path]


@pytest.fixture(scope="module")
def cluster(shared_data, tmp_path_factory):
    """As README "Multi-node" says: a server, the pool, `prefect deploy`, and a worker per node on its own queue
    (node 0's also on the default queue), SPEEDRUN_NODE naming each; one store both see."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tmp = tmp_path_factory.mktemp("multinode")
    repo = tmp / "repo"  # the checkout both "nodes" run (prefect deploy's build step reads its commit)
    shutil.copytree(REPO_ROOT, repo, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache",
                                                                   "wandb", ".venv"))
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "multinode", cwd=repo)
    store = tmp / "store"  # the shared store: both nodes see it at the same path
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SPEEDRUN_"))}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_API_URL=api, DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", WANDB_MODE="offline", GLOO_SOCKET_IFNAME="lo")
    env.pop("PYTHONPATH", None)
    node_env = {**env, "SPEEDRUN_PROJECT_DIR": str(repo), "SPEEDRUN_HOME": str(store),
                "PREFECT_WORKER_QUERY_SECONDS": "1"}
    logs = {name: tmp / f"{name}.log" for name in ("server", "node-0", "node-1")}
    with background(["server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off"],
                    {**env, "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
                     "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false"}, repo, logs["server"],
                    signal.SIGTERM) as server, temporary_settings({PREFECT_API_URL: api}):
        wait_healthy(api, server, logs["server"])
        prefect("work-pool", "create", "speedrun", "--type", "process", env=env, cwd=repo)
        prefect("deploy", "--name", "torchrun-node", "--name", "smoke", env=env, cwd=repo)
        for queue in ("node-0", "node-1"):  # before the workers: one polling a queue that is not there gets nothing
            prefect("work-queue", "create", queue, "--pool", "speedrun", env=env, cwd=repo)
        with background(["worker", "start", "--pool", "speedrun", "--work-queue", "default", "--work-queue", "node-0",
                         "--name", "node-0", "--limit", "1"], {**node_env, "SPEEDRUN_NODE": "node-0"}, repo,
                        logs["node-0"], signal.SIGINT), \
                background(["worker", "start", "--pool", "speedrun", "--work-queue", "node-1", "--name", "node-1",
                            "--limit", "1"], {**node_env, "SPEEDRUN_NODE": "node-1"}, repo, logs["node-1"],
                           signal.SIGINT):
            yield Cluster(repo, store, {**env, "SPEEDRUN_NODE": "node-0"}, logs)


def node_runs(client, rank: int, since: float = 0.0) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"node:{rank}"])))
    return [r for r in runs if r.created.timestamp() >= since]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find node 1's torchrun")
def test_two_nodes_kill_node1_retry_resumes_and_equals_one_node(cluster, shared_data, tmp_path):
    import torch
    from prefect.client.orchestration import get_client

    repo, store, env = cluster.repo, cluster.store, cluster.env
    two_nodes = speedrun_cli({**SETS, **TWO_NODES}, store, shared_data)
    started = time.time()
    with get_client(sync_client=True) as client:
        # 1. node 1's torchrun dies mid-run: both sides fail within the rendezvous timeout, naming node 1
        first_log = tmp_path / "first.log"
        with open(first_log, "w") as out:
            node0 = subprocess.Popen(two_nodes, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not list(store.glob(f"{PRETRAIN_WORK}/run/checkpoints/complete_{SAVE_EVERY:06d}")):
                assert node0.poll() is None, first_log.read_text()[-5000:]
                assert time.monotonic() < deadline, first_log.read_text()[-5000:]
                time.sleep(0.2)
            [agent] = torchrun_agents(1)
            os.kill(agent, signal.SIGKILL)
            killed = time.monotonic()
            rc = node0.wait(timeout=RDZV_TIMEOUT_S + 60)
        finally:
            if node0.poll() is None:
                node0.kill()
        node0_failed_after = time.monotonic() - killed
        out = first_log.read_text()
        assert rc != 0 and "node 1" in out, out[-5000:]
        assert node0_failed_after < RDZV_TIMEOUT_S, (node0_failed_after, out[-3000:])
        [run] = node_runs(client, 1, since=started)
        node1_run = wait_final(client, str(run.id), timeout_s=RDZV_TIMEOUT_S, worker_log=cluster.logs["node-1"])
        assert node1_run.state.type.value in ("FAILED", "CRASHED", "CANCELLED"), node1_run.state
        assert not torchrun_agents(0) and not torchrun_agents(1)

        # 2. the retry resumes from the last complete checkpoint on both nodes and completes
        retry = subprocess.run(two_nodes, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-5000:]
        [work] = store.glob(PRETRAIN_WORK)
        for log in (work / "log.txt", work / "nodes" / "node-1.log"):  # each node's first rank says so
            assert "resuming from step" in log.read_text(), log
        runs = node_runs(client, 1, since=started)
        assert sorted(r.state.type.value for r in runs) == ["COMPLETED", "FAILED"], [r.state for r in runs]
        two_node_weights = torch.load(final_model(store), map_location="cpu")

    # 3. the same run on one node with two ranks (same key: world size 2) gives the same weights
    one_node = speedrun_cli({**SETS, "runtime.nproc_per_node": 2}, store, shared_data, "--refresh", "pretrain")
    single = subprocess.run(one_node, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-5000:]
    one_node_weights = torch.load(final_model(store), map_location="cpu")
    assert one_node_weights.keys() == two_node_weights.keys()
    for name, tensor in one_node_weights.items():
        diff = (tensor.float() - two_node_weights[name].float()).abs().max().item()
        assert diff <= 1e-5, (name, diff)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the ranks")
def test_cancelling_the_deployment_run_cancels_every_node_and_kills_every_rank(cluster, shared_data):
    """`prefect deployment run speedrun/smoke` with two nodes, cancelled mid-training as from the UI."""
    from prefect.client.orchestration import get_client

    overrides = {**SETS, **TWO_NODES, "pretrain.num_iterations": STEPS + 8}  # a pretrain key of its own
    params = {"overrides": overrides, "mirror": str(shared_data), "store": str(cluster.store), "until": "pretrain"}
    started = time.time()
    with get_client(sync_client=True) as client:
        run_id = run_deployment(params, cluster.env, cluster.repo)
        deadline = time.monotonic() + 600
        while not [m for m in cluster.store.glob(f"{PRETRAIN_WORK}/run/metrics.jsonl")
                   if m.stat().st_mtime >= started and '"step": 3' in m.read_text()]:
            run = client.read_flow_run(run_id)
            assert run.state.type.value not in FINAL_STATES, (run.state, cluster.logs["node-0"].read_text()[-4000:])
            assert time.monotonic() < deadline, cluster.logs["node-0"].read_text()[-4000:]
            time.sleep(0.5)
        [node1] = node_runs(client, 1, since=started)
        assert client.read_flow_run(str(node1.id)).state.type.value == "RUNNING"
        prefect("flow-run", "cancel", run_id, env=cluster.env, cwd=cluster.repo)
        assert wait_final(client, run_id, timeout_s=120, worker_log=cluster.logs["node-0"]).state.type.value == \
            "CANCELLED"
        node1 = wait_final(client, str(node1.id), timeout_s=120, worker_log=cluster.logs["node-1"])
        # cancelled, not failed: its ranks stopped because node 0's did (tests/test_node_runs.py has the races)
        assert node1.state.type.value == "CANCELLED", node1.state
        deadline = time.monotonic() + 90
        # every agent and rank training into this store, on both nodes, exits (they save, then go); other tests
        # may be training on this machine at the same time (two workers), into stores of their own
        while trainer_pids(str(cluster.store)):
            assert time.monotonic() < deadline, trainer_pids(str(cluster.store))
            time.sleep(0.5)

def launch_for(work: Path, nonce: str = "n1") -> dict:
    return {"module": "model.train", "args": [], "nnodes": 2, "rdzv_endpoint": "127.0.0.1:1", "rdzv_timeout_s": 5,
            "work": str(work), "nonce": nonce, "parent_flow_run": None, "torchrun": {}}


def test_node_that_does_not_share_the_store_fails_before_any_rank(tmp_path):
    from tasks.nodes import NodeError, run_node

    with pytest.raises(NodeError, match=r"node 1 .* finds nothing at .*launch\.json.*fix: put runtime\.store"):
        run_node("pretrain", 1, launch_for(tmp_path / "work"), log=print)
    assert not (tmp_path / "work" / "nodes").exists() or not list((tmp_path / "work" / "nodes").iterdir())


def test_node_sees_an_older_launch_or_other_code(tmp_path):
    from tasks.nodes import NODES, NodeError, run_node, trainer_code
    from tasks.store import atomic_write_json

    shared = tmp_path / "work" / NODES
    shared.mkdir(parents=True)
    atomic_write_json(shared / "launch.json", {"nonce": "old", "code": trainer_code()})
    with pytest.raises(NodeError, match="finds an older launch"):
        run_node("pretrain", 1, launch_for(tmp_path / "work"), log=print)
    code = trainer_code()
    code["model/gpt.py"] = "0" * 64
    atomic_write_json(shared / "launch.json", {"nonce": "n1", "code": code})
    with pytest.raises(NodeError, match=r"runs other model code than node 0 \(model/gpt\.py differ\).*same commit"):
        run_node("pretrain", 1, launch_for(tmp_path / "work"), log=print)
    assert not list(shared.glob("probe-*"))  # node 0 never gets a probe from it: it fails before launching


def test_node_ranks_go_to_the_other_nodes_queues():
    from tasks.nodes import other_queues

    queues = ["node-0", "node-1", "node-2"]
    assert other_queues(queues, 2, here="node-0") == ["node-1"]
    assert other_queues(queues, 3, here="node-1") == ["node-0", "node-2"]  # the flow landed on node-1
    assert other_queues(queues, 2, here="") == ["node-1"]  # not set: this is the first listed


def test_multinode_without_a_server_fails_naming_the_fix(shared_data, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.config import ConfigError, load_config
    from tasks.nodes import check_multinode

    cfg = load_config("smoke", sets=["runtime.nnodes=2", "sft.total_batch_size=4096"], mirror=str(shared_data), store=str(tmp_path))
    with temporary_settings(restore_defaults={PREFECT_API_URL}), \
            pytest.raises(ConfigError, match="needs a Prefect server.*fix: start one"):
        check_multinode(cfg.runtime)
    check_multinode(load_config("smoke", mirror=str(shared_data), store=str(tmp_path)).runtime)  # one node: nothing


def test_a_missing_queue_or_deployment_fails_before_any_stage(cluster, shared_data, tmp_path):
    from tasks.config import ConfigError, load_config
    from tasks.nodes import check_multinode

    sets = ["runtime.nnodes=2", "sft.total_batch_size=4096"]
    check_multinode(load_config("smoke", sets=sets, mirror=str(shared_data), store=str(tmp_path)).runtime)
    missing_queue = load_config("smoke", sets=[*sets, "runtime.node_queues=[node-0,gpu-7]"], mirror=str(shared_data),
                                store=str(tmp_path))
    with pytest.raises(ConfigError, match=r"no work queue 'gpu-7'; fix: prefect work-queue create gpu-7 --pool speedrun"):
        check_multinode(missing_queue.runtime)
    no_deployment = load_config("smoke", sets=[*sets, "runtime.node_deployment=speedrun/nope"],
                                mirror=str(shared_data), store=str(tmp_path))
    with pytest.raises(ConfigError, match=r"no deployment 'speedrun/nope'.*fix: prefect deploy --name torchrun-node"):
        check_multinode(no_deployment.runtime)
