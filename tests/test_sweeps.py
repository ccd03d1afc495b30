"""The sweeps (flows/miniseries.py, flows/scaling_laws.py) on a real Prefect server, two workers for two GPU nodes.

As a team runs them: `prefect server start`, the pools `speedrun` (two workers `node-a` and `node-b`, `--limit 1`
each, as on two GPU nodes) and `speedrun-sweeps` (one worker for the sweeps themselves), `prefect deploy` of
speedrun/sweep-cell and speedrun/scaling-laws-smoke, one store shared by every worker.

- A miniseries from the CLI with its cells on the pool: both cells train, one per worker; results.csv holds
  each cell's numbers as its artifacts say.
- A third depth with an impossible device batch fails that cell alone (the others come back Cached and the sweep
  fails naming it); after the fix only that cell trains, and the table keeps the first two rows as they were.
- The smoke isoFLOP sweep as a deployment run: 2 budgets x 2 depths, the results table artifact, a valid plot.

Cells run the smoke preset shrunk further (4 steps, 3 CORE tasks) so the whole test stays within minutes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_deployment_e2e import (REPO_ROOT, background, free_port, git, prefect, read_artifact, small_bundle,
                                       wait_final, wait_healthy)

SHRINK = {"pretrain.num_iterations": 4, "pretrain.warmup_steps": 1, "pretrain.eval_every": 4,
          "pretrain.eval_tokens": 2048, "base_eval.eval": "core", "base_eval.max_per_task": 11}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sweep_cli(module: str, *args: str, env: dict, cwd: Path) -> tuple[int, dict, str]:
    summary = cwd / f"summary-{time.monotonic_ns()}.json"
    proc = subprocess.run([sys.executable, "-m", module, *args, "--summary-json", str(summary)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert summary.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.returncode, json.loads(summary.read_text()), proc.stdout + proc.stderr


def states(summary: dict) -> dict[str, str]:
    return {name: cell["state"] for name, cell in summary["cells"].items()}


def ran_on(logs: dict[str, Path], flow_run: str) -> set[str]:
    """The workers that ran the flow run. A worker logs every run it submits; when two workers pick up the same
    run, the server aborts one of the submissions and that worker logs so."""
    ran = set()
    for name, log in logs.items():
        text = log.read_text()
        if f"submitting flow run '{flow_run}'" in text and f"Aborted submission of flow run '{flow_run}'" not in text:
            ran.add(name)
    return ran


def check_rows(summary: dict, rows: list[dict]) -> None:
    """Each row holds what its cell's artifacts say: steps, val bpb, CORE, training time."""
    for row in rows:
        art = Path(summary["cells"][row["cell"]]["artifact"])
        pretrain = json.loads((art / "summary.json").read_text())
        assert int(row["num_iterations"]) == pretrain["step"]
        assert float(row["val_bpb"]) == pytest.approx(pretrain["val_bpb"], rel=1e-12)
        assert float(row["train_time_sec"]) == pytest.approx(pretrain["total_training_time"], rel=1e-12)
        assert int(row["tokens_trained"]) == pretrain["step"] * pretrain["total_batch_size"]
        assert 0.0 <= float(row["val_bpb"]) < 10 and row["core_score"] != ""
        assert row["hardware"] == "cpu" and row["pretrain_key"] == summary["cells"][row["cell"]]["key"]


def read_csv(path: str) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sweeps_spread_over_two_workers_cached_grow_and_fail_one_cell(shared_data, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    repo = tmp_path / "repo"  # a checkout to deploy from (the build step reads its commit)
    shutil.copytree(REPO_ROOT, repo, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache",
                                                                   "wandb", ".venv"))
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "sweeps", cwd=repo)
    store = tmp_path / "store"
    bundle = small_bundle(shared_data, tmp_path / "bundle")
    shrink = {**SHRINK, "base_eval.bundle": str(bundle)}
    sets = [arg for key, value in shrink.items() for arg in ("--set", f"{key}={value}")]

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SPEEDRUN_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api, DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", WANDB_MODE="offline")
    env.pop("PYTHONPATH", None)
    worker_env = {**env, "SPEEDRUN_PROJECT_DIR": str(repo), "SPEEDRUN_HOME": str(store),
                  "PREFECT_WORKER_QUERY_SECONDS": "1"}
    server_log = tmp_path / "server.log"
    logs = {name: tmp_path / f"{name}.log" for name in ("node-a", "node-b")}
    with background(["server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off"],
                    # no scheduler; no event persister: nothing here reads the events table, and on SQLite its
                    # writes race the state writes of four concurrent runs ("database is locked")
                    {**env, "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
                     "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false"}, repo, server_log,
                    signal.SIGTERM) as server, temporary_settings({PREFECT_API_URL: api}):
        wait_healthy(api, server, server_log)
        prefect("work-pool", "create", "speedrun", "--type", "process", env=env, cwd=repo)
        prefect("work-pool", "set-concurrency-limit", "speedrun", "2", env=env, cwd=repo)  # two nodes
        prefect("work-pool", "create", "speedrun-sweeps", "--type", "process", env=env, cwd=repo)
        prefect("deploy", "--name", "sweep-cell", "--name", "scaling-laws-smoke", env=env, cwd=repo)
        with background(["worker", "start", "--pool", "speedrun", "--limit", "1", "--name", "node-a"], worker_env,
                        repo, logs["node-a"], signal.SIGINT), \
                background(["worker", "start", "--pool", "speedrun", "--limit", "1", "--name", "node-b"], worker_env,
                           repo, logs["node-b"], signal.SIGINT), \
                background(["worker", "start", "--pool", "speedrun-sweeps", "--name", "sweeps"], worker_env, repo,
                           tmp_path / "sweeps.log", signal.SIGINT), \
                get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while len([w for w in client.read_workers_for_work_pool("speedrun") if w.status.value == "ONLINE"]) < 2:
                assert time.monotonic() < deadline, "the two node workers never came online"
                time.sleep(0.5)
            mini = ("flows.miniseries", "--preset", "smoke", "--mirror", str(shared_data), "--store", str(store),
                    "--cells", "pool", *sets)

            # 1. two depths, one cell per node; the numbers in results.csv are the artifacts'
            rc, first, out = sweep_cli(*mini, "--depths", "1,2", env=env, cwd=repo)
            assert rc == 0 and states(first) == {"d1": "Completed", "d2": "Completed"}, out[-4000:]
            rows = read_csv(first["results_csv"])
            assert [r["cell"] for r in rows] == ["d1", "d2"] and [r["depth"] for r in rows] == ["1", "2"]
            check_rows(first, rows)
            assert int(rows[0]["num_params"]) < int(rows[1]["num_params"])
            workers = [ran_on(logs, first["cells"][c]["flow_run"]) for c in ("d1", "d2")]
            assert all(len(w) == 1 for w in workers) and workers[0] != workers[1], workers  # one cell per node
            png = Path(first["report"]).with_name("miniseries.png").read_bytes()
            assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000

            # 2. a third depth with a batch that cannot make a step fails alone, the finished cells Cached;
            # 3. fixed, only it trains, and the first two rows are those of step 1
            rc, failed, out = sweep_cli(*mini, "--depths", "1,2,3", "--device-batch", "3=5", env=env, cwd=repo)
            assert rc == 1 and states(failed) == {"d1": "Cached", "d2": "Cached", "d3": "Failed"}, out[-4000:]
            assert "cell d3" in failed["cells"]["d3"]["error"] and "device_batch_size" in failed["cells"]["d3"]["error"]
            assert "1 of 3 cells failed" in out and "d3" in out
            rc, grown, out = sweep_cli(*mini, "--depths", "1,2,3", env=env, cwd=repo)
            assert rc == 0 and states(grown) == {"d1": "Cached", "d2": "Cached", "d3": "Completed"}, out[-4000:]
            grown_rows = read_csv(grown["results_csv"])
            assert [r["cell"] for r in grown_rows] == ["d1", "d2", "d3"] and grown_rows[:2] == rows
            check_rows(grown, grown_rows)

            # 4. the smoke isoFLOP sweep as a deployment run: 2 budgets x 2 depths over both nodes
            params = {"preset": "smoke", "flops": [2e10, 4e10], "depths": [1, 2], "mirror": str(shared_data),
                      "store": str(store), "overrides": shrink, "summary_path": str(tmp_path / "scaling.json")}
            out = prefect("deployment", "run", "speedrun/scaling-laws-smoke", "--params", json.dumps(params),
                          env=env, cwd=repo)
            run_id = out.split("UUID:")[1].split()[0]
            run = wait_final(client, run_id, timeout_s=600, worker_log=tmp_path / "sweeps.log")
            assert run.state.is_completed(), (tmp_path / "sweeps.log").read_text()[-4000:]
            scaling = json.loads((tmp_path / "scaling.json").read_text())
            assert states(scaling) == {f"{c}-d{d}": "Completed" for c in ("2e10", "4e10") for d in (1, 2)}
            rows = read_csv(scaling["results_csv"])
            assert [(float(r["flops_budget"]), int(r["depth"])) for r in rows] == \
                [(2e10, 1), (2e10, 2), (4e10, 1), (4e10, 2)]
            assert all(int(r["params_total"]) == sum(int(r[k]) for k in ("params_wte", "params_value_embeds",
                       "params_lm_head", "params_transformer", "params_scalars")) for r in rows)
            steps = {(float(r["flops_budget"]), int(r["depth"])): int(r["num_iterations"]) for r in rows}
            assert steps[(4e10, 1)] > steps[(2e10, 1)] > steps[(2e10, 2)]  # the budget sets the horizon
            check_rows(scaling, rows)
            assert all(fit["points"] == 2 and fit["optimal_params"] is None for fit in scaling["fits"])  # 2 sizes
            png = Path(scaling["plots"][0]).read_bytes()
            assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
            table = json.loads(read_artifact(client, "speedrun-smoke-scaling-laws", run_id).data)
            assert len(table) == 4
            everything = [first["cells"][c]["flow_run"] for c in ("d1", "d2")] + \
                [cell["flow_run"] for cell in scaling["cells"].values()]
            assert set().union(*(ran_on(logs, r) for r in everything)) == set(logs)  # both nodes trained cells
