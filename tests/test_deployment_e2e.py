"""The deployments end to end on a real Prefect server: prefect.yaml, a process work pool, a worker.

What a user does, in a copy of the repo: `prefect server start` (127.0.0.1, free port, temp PREFECT_HOME),
`prefect work-pool create`, `prefect deploy --all`, `prefect worker start`, `prefect deployment run
speedrun/smoke`. The first run fails the way real runs fail: the chat-eval data directory lacks
gsm8k/test.jsonl. The test puts the file in place and retries the flow run exactly as the UI's Retry
button does (set_state AwaitingRetry, force), then checks through the API that the retried run completed
with every stage before the failed one Cached and the failed one and those after it executed. A second
run is all Cached. A run cancelled mid-pretrain saves the step in flight, and its Retry resumes from it and
ends bitwise equal to an uninterrupted run. Then a run with a baseline it cannot meet fails in the report with RegressionDetected,
every time, and the alert automation from deployments/automations posts it to a webhook.

The smoke preset is shrunk with the `overrides` parameter (fewer steps, a 3-task CORE bundle, two problems
per chat task) so the whole test stays within a few minutes on 2 cores.
"""

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tasks.store import WORK

REPO_ROOT = Path(__file__).resolve().parents[1]
POOL = "speedrun"
STAGES = ["shards", "tokenizer", "eval_bundle", "pretrain", "base_eval", "sft", "chat_eval", "report"]
DEPLOYMENTS = {"smoke", "cpu", "d12", "d20", "d24", "d26", "nightly"}
CORE_TASKS = ("copa", "piqa", "winograd")  # 0-shot and 10-shot, cheap
SHRINK = {
    "pretrain.num_iterations": 10, "pretrain.eval_every": 5, "pretrain.save_every": 5,
    "base_eval.max_per_task": 11, "base_eval.eval": "core,bpb", "base_eval.split_tokens": 4096,
    "sft.num_iterations": 6, "sft.eval_every": 3, "sft.eval_tokens": 4096, "sft.save_every": 3,
    "chat_eval.max_problems": 2, "chat_eval.max_new_tokens": 12,
}
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect(*args: str, env: dict, cwd: Path, timeout: int = 180) -> str:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def stop(proc: subprocess.Popen, sig: int, wait_s: float) -> None:
    """Signal the process (by PID); SIGKILL its process group if it outlives `wait_s`."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what is left: flow-run processes, torchrun children
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def background(args: list[str], env: dict, cwd: Path, log: Path, stop_signal: int):
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc, stop_signal, wait_s=30)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prefect server exited:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"true":
                return
        time.sleep(0.5)
    raise AssertionError(f"server not healthy after {timeout_s}s:\n{log.read_text()[-3000:]}")


class Webhook:
    """A local HTTP endpoint that records the bodies POSTed to it (the alert's destination)."""

    def __init__(self):
        self.bodies: list[str] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                hook.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def small_bundle(shared_data: Path, dest: Path) -> Path:
    """The mirror's CORE bundle cut down to CORE_TASKS (base_eval.allow_missing_tasks is on in smoke)."""
    src = shared_data / "eval_bundle"
    core = yaml.safe_load((src / "core.yaml").read_text())
    core["icl_tasks"] = [t for t in core["icl_tasks"] if t["label"] in CORE_TASKS]
    for task in core["icl_tasks"]:
        (dest / "eval_data" / task["dataset_uri"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "eval_data" / task["dataset_uri"], dest / "eval_data" / task["dataset_uri"])
    (dest / "core.yaml").write_text(yaml.safe_dump(core))
    shutil.copy2(src / "eval_meta_data.csv", dest / "eval_meta_data.csv")
    return dest


def run_deployment(params: dict, env: dict, cwd: Path) -> str:
    out = prefect("deployment", "run", "speedrun/smoke", "--params", json.dumps(params), env=env, cwd=cwd)
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def wait_final(client, run_id: str, timeout_s: float = 420, worker_log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.type.value in FINAL_STATES:
            return run
        time.sleep(1)
    tail = worker_log.read_text()[-4000:] if worker_log is not None and worker_log.exists() else "(no worker log)"
    raise AssertionError(f"flow run {run_id} still {run.state.name if run.state else None} after {timeout_s}s; "
                         f"the worker's log ends:\n{tail}")


def wait_process_reaped(client, run_id: str, timeout_s: float = 120) -> None:
    """Wait until the worker has reaped a finished run's process (and so released its slot).

    A run reports Failed from inside its process, before the process exits. Prefect 3.8.8's worker releases its
    `--limit` slot only after reaping the process, and crashes if the same run id is scheduled again while it
    still holds that slot ("this borrower is already holding one of this CapacityLimiter's tokens",
    PrefectHQ/prefect#16806): a Retry pressed within that second kills the worker. The README says so.
    """
    pid = (client.read_flow_run(run_id).infrastructure_pid or "").rpartition(":")[2]
    deadline = time.monotonic() + timeout_s
    while pid.isdigit() and Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"the process {pid} of flow run {run_id} is still there"
        time.sleep(0.2)
    time.sleep(2.0)  # the slot is released right after the reap


def wait_for_log_line(store: Path, text: str, worker_log: Path, timeout_s: float = 300) -> Path:
    """The work/ directory of the pretrain artifact whose log.txt shows `text` (polled)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for log in store.glob(f"stages/pretrain/*/{WORK}/log.txt"):
            if text in log.read_text():
                return log.parent
        time.sleep(0.2)
    raise AssertionError(f"no pretrain log shows {text!r}; the worker's log ends:\n{worker_log.read_text()[-4000:]}")


def stage_runs(client, run_id: str) -> dict[int, list[tuple[str, str]]]:
    """{attempt (flow_run_run_count): [(stage, state name), ...] in execution order}."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    attempts: dict[int, list] = {}
    for tr in sorted(runs, key=lambda tr: (tr.flow_run_run_count, tr.expected_start_time)):
        attempts.setdefault(tr.flow_run_run_count, []).append((tr.name.rsplit("-", 1)[0], tr.state.name))
    return attempts


def read_artifact(client, key: str, run_id: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                                 flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert found, f"no artifact {key!r} for flow run {run_id}"
    return found[-1]


@pytest.mark.slow
def test_deploy_run_fail_retry_like_the_ui_rerun_cached_and_regression_alert(shared_data, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import State, StateType

    repo = tmp_path / "repo"  # a fresh checkout: the worker's SPEEDRUN_PROJECT_DIR
    shutil.copytree(REPO_ROOT, repo, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache",
                                                                   "wandb", ".venv", "s1.json", "s2.json"))
    chat_data = tmp_path / "chat_eval"
    shutil.copytree(shared_data / "chat_eval", chat_data)
    gsm8k = chat_data / "gsm8k" / "test.jsonl"
    gsm8k.unlink()  # not downloaded yet: the chat_eval stage will fail on it
    bundle = small_bundle(shared_data, tmp_path / "bundle")
    params = {"mirror": str(shared_data),
              "overrides": {**SHRINK, "chat_eval.data_dir": str(chat_data), "base_eval.bundle": str(bundle)}}

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SPEEDRUN_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api, DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(repo), WANDB_MODE="offline")
    # The nightly cron must not start d24 runs here; its schedule is checked through the API instead.
    server_env = {**env, "PREFECT_API_SERVICES_SCHEDULER_ENABLED": "false"}
    worker_env = {**env, "SPEEDRUN_PROJECT_DIR": str(repo), "SPEEDRUN_HOME": str(tmp_path / "store"),
                  "PREFECT_WORKER_QUERY_SECONDS": "2"}
    store = tmp_path / "store"

    server_log = tmp_path / "server.log"
    with background(["server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off"],
                    server_env, repo, server_log, signal.SIGTERM) as server, \
            temporary_settings({PREFECT_API_URL: api}):
        wait_healthy(api, server, server_log)
        prefect("work-pool", "create", POOL, "--type", "process", env=env, cwd=repo)
        prefect("work-pool", "set-concurrency-limit", POOL, "1", env=env, cwd=repo)
        prefect("deploy", "--all", env=env, cwd=repo)

        with get_client(sync_client=True) as client:
            deployments = {d.name: d for d in client.read_deployments()}
            assert set(deployments) == DEPLOYMENTS
            assert all(d.work_pool_name == POOL for d in deployments.values())
            assert deployments["d26"].parameters == {"preset": "d26"}
            assert deployments["smoke"].pull_steps == [{"prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $SPEEDRUN_PROJECT_DIR }}"}}]  # no machine path in what was deployed
            nightly = deployments["nightly"]
            assert nightly.parameters == {"preset": "d24", "refresh": ["all"], "overrides": {"report.regression": True}}
            assert [(s.schedule.cron, s.active) for s in nightly.schedules] == [("0 2 * * *", True)]
            assert client.read_work_pool(POOL).concurrency_limit == 1

            worker_log = tmp_path / "worker.log"
            with background(["worker", "start", "--pool", POOL, "--limit", "1", "--name", "e2e"], worker_env, repo,
                            worker_log, signal.SIGINT):
                # 1. the first run fails in chat_eval: a real missing input, after every earlier stage completed.
                # It refreshes every stage, as speedrun/nightly does: the retry must not rebuild them again.
                run_id = run_deployment({**params, "refresh": ["all"]}, env, repo)
                run = wait_final(client, run_id, worker_log=worker_log)
                assert run.state.type == StateType.FAILED, worker_log.read_text()[-5000:]
                failed_at = STAGES.index("chat_eval")
                assert stage_runs(client, run_id)[1] == [(s, "Completed") for s in STAGES[:failed_at]] + \
                    [("chat_eval", "Failed")]
                assert "gsm8k" in run.state.message and "test.jsonl" in run.state.message

                # 2. fix the cause, then Retry exactly as the UI does
                shutil.copy2(shared_data / "chat_eval" / "gsm8k" / "test.jsonl", gsm8k)
                wait_process_reaped(client, run_id)
                accepted = client.set_flow_run_state(run_id, State(type=StateType.SCHEDULED, name="AwaitingRetry",
                                                                   message="Retry from the UI"), force=True)
                assert accepted.status.value == "ACCEPT"
                run = wait_final(client, run_id, worker_log=worker_log)
                assert run.state.type == StateType.COMPLETED, worker_log.read_text()[-5000:]
                assert run.run_count == 2
                assert stage_runs(client, run_id)[2] == [(s, "Cached") for s in STAGES[:failed_at]] + \
                    [(s, "Completed") for s in STAGES[failed_at:]]
                history = [s.name for s in client.read_flow_run_states(run_id)]
                assert history.count("Failed") == 1 and "AwaitingRetry" in history and history[-1] == "Completed"

                # the report, summary and submission landed in the store, and the report is a Prefect artifact
                (report_dir,) = [p.parent for p in store.glob("stages/report/*/manifest.json")]
                summary = json.loads((report_dir / "summary.json").read_text())
                assert summary["step"] == 10 and summary["preset"] == "smoke"
                assert summary["min_val_bpb"] > 0 and -1 <= summary["core_metric"] <= 1
                assert summary["chatcore"] is not None
                assert "| time (hours) |" in (report_dir / "submission.md").read_text()
                assert (report_dir / "val_bpb.png").read_bytes()[:4] == b"\x89PNG"
                report_md = (report_dir / "report.md").read_text()
                published = read_artifact(client, "speedrun-smoke-report", run_id).data
                assert "](data:image/png;base64,iVBORw0KGgo" in published  # the plot inline, not a broken link
                assert published.split("![val bpb]")[0] == report_md.split("![val bpb]")[0]
                core_table = read_artifact(client, "speedrun-smoke-core", run_id).data
                core_table = json.loads(core_table) if isinstance(core_table, str) else core_table
                assert sorted(row["task"] for row in core_table) == sorted(CORE_TASKS)

                # 3. the same run again: every stage Cached
                again = run_deployment(params, env, repo)
                assert wait_final(client, again, worker_log=worker_log).state.type == StateType.COMPLETED
                assert stage_runs(client, again) == {1: [(s, "Cached") for s in STAGES]}

                # 4. Cancel mid-pretrain, as the UI's Cancel does: the ranks finish their step and save it; Retry
                # resumes from that step and ends bitwise where an uninterrupted run ends.
                longer = {**params, "until": "pretrain",
                          "overrides": {**params["overrides"], "pretrain.num_iterations": 24, "pretrain.save_every": -1}}
                cancelled = run_deployment(longer, env, repo)
                work = wait_for_log_line(store, "step 00005/00024", worker_log)
                client.set_flow_run_state(cancelled, State(type=StateType.CANCELLING, name="Cancelling"), force=True)
                run = wait_final(client, cancelled, worker_log=worker_log)
                assert run.state.type == StateType.CANCELLED, run.state
                checkpoints = work / "run" / "checkpoints"
                saved = sorted(int(p.name.removeprefix("complete_")) for p in checkpoints.glob("complete_*"))
                assert saved and 5 <= saved[-1] < 24, saved  # the step in flight, saved on the way out
                assert not (work.parent / "manifest.json").exists()
                wait_process_reaped(client, cancelled)
                client.set_flow_run_state(cancelled, State(type=StateType.SCHEDULED, name="AwaitingRetry"), force=True)
                run = wait_final(client, cancelled, worker_log=worker_log)
                assert run.state.type == StateType.COMPLETED, worker_log.read_text()[-5000:]
                assert f"resuming from step {saved[-1]} " in (work / "log.txt").read_text()
                straight = run_deployment({**longer, "store": str(tmp_path / "store-straight")}, env, repo)
                assert wait_final(client, straight, worker_log=worker_log).state.type == StateType.COMPLETED
                (straight_art,) = (tmp_path / "store-straight").glob("stages/pretrain/*/manifest.json")
                model = "checkpoint/model_000024.pt"
                assert json.loads(straight_art.read_text())["files"][model]["sha256"] == \
                    json.loads((work.parent / "manifest.json").read_text())["files"][model]["sha256"]

                # 5. a baseline the run cannot meet: the report raises RegressionDetected on every run, and the
                # alert automation (deployments/automations) posts the failure to a webhook
                (repo / "deployments" / "baselines" / "e2e-strict.yaml").write_text(yaml.safe_dump(
                    {"preset": "smoke", "metrics": {"min_val_bpb": {"value": 0.5, "tolerance": 0.01}}}))
                hook = Webhook()
                subprocess.run([sys.executable, "-m", "deployments.automations.nightly_alert", "--webhook-url",
                                hook.url, "--tag", "cpu"], cwd=repo, env=env, check=True, capture_output=True,
                               timeout=120)
                gated = {**params, "overrides": {**params["overrides"], "report.regression": True,
                                                 "report.baseline": "e2e-strict"}}
                for _ in range(2):
                    regressed = run_deployment(gated, env, repo)
                    run = wait_final(client, regressed, worker_log=worker_log)
                    assert run.state.type == StateType.FAILED
                    assert stage_runs(client, regressed) == {1: [(s, "Cached") for s in STAGES[:-1]] +
                                                             [("report", "Failed")]}
                    assert "RegressionDetected" in run.state.message and "min_val_bpb" in run.state.message
                deadline = time.monotonic() + 60
                while not any(regressed in body for body in hook.bodies) and time.monotonic() < deadline:
                    time.sleep(1)
                alert = next(body for body in hook.bodies if regressed in body)
                assert "Failed" in alert and "min_val_bpb" in alert and "baseline 0.5" in alert
