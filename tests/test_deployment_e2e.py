"""The deployments end to end on a real Prefect server: prefect.yaml, a process work pool, a worker.

What a team does, in a copy of the repo made a git repository with a bare `origin`: `prefect server start`
(127.0.0.1, free port, temp PREFECT_HOME), `prefect work-pool create`, `prefect deploy --all`, the alert
automations, `prefect worker start`, then `prefect deployment run speedrun/nightly` night after night.

- Night 1 pulls the branch head and fails the way real runs fail: the chat-eval data directory lacks
  gsm8k/test.jsonl. The test puts the file in place and retries the flow run exactly as the UI's Retry button
  does (set_state AwaitingRetry, force): every stage before the failed one is Cached, the failed one and those
  after it execute, and the success alert carries the verdict line.
- The same run from the worker's own checkout (speedrun/smoke, same commit) is all Cached.
- A run cancelled mid-pretrain saves the step in flight; its Retry resumes from it and ends bitwise equal to an
  uninterrupted run.
- A developer records night 1 as the baseline and pushes; night 2 runs that commit: two history entries, a
  trend of two rows, run names with their commits, one wandb run per night.
- A commit that moves one step of the baseline's val bpb curve out of reach fails the report naming the step,
  on every run, and the failure alert carries it. A pull that fails fails the run before any stage.

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
DEPLOYMENTS = {"smoke", "cpu", "d12", "d20", "d24", "d26", "nightly", "sweep-cell", "torchrun-node"}
SWEEPS = {"miniseries", "scaling-laws", "miniseries-smoke", "scaling-laws-smoke"}  # pool speedrun-sweeps
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


def run_deployment(params: dict, env: dict, cwd: Path, deployment: str = "smoke") -> str:
    out = prefect("deployment", "run", f"speedrun/{deployment}", "--params", json.dumps(params), env=env, cwd=cwd)
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def git(*args: str, cwd: Path) -> str:
    """git with a fixed identity (CI machines have none configured)."""
    proc = subprocess.run(["git", "-c", "user.name=e2e", "-c", "user.email=e2e@example.com", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"git {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout.strip()


def commit_and_push(dev: Path, message: str) -> str:
    """Commit everything in the developer's clone and push it to the branch the nightly pulls."""
    git("add", "-A", cwd=dev)
    git("commit", "-q", "-m", message, cwd=dev)
    git("push", "-q", "origin", "HEAD:main", cwd=dev)
    return git("rev-parse", "--short=7", "HEAD", cwd=dev)


def wait_for_body(hook: "Webhook", *needles: str, timeout_s: float = 90) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for body in list(hook.bodies):
            if all(n in body for n in needles):
                return body
        time.sleep(1)
    raise AssertionError(f"no webhook POST contains {needles}; got {hook.bodies}")


def artifacts_of(client, run_id: str) -> dict:
    """{key: data} of a flow run's artifacts, the newest version of each key."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key: (json.loads(a.data) if isinstance(a.data, str) and a.type == "table" else a.data)
            for a in sorted(found, key=lambda a: a.created)}


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


def stage_runs(client, run_id: str, timeout_s: float = 60) -> dict[int, list[tuple[str, str | None]]]:
    """{attempt (flow_run_run_count): [(stage, state name), ...] in execution order} of a finished flow run.

    The server records task runs from their events, after the fact: on a loaded machine a task run's final state
    can land after its flow run's, so this waits (up to `timeout_s`) until every task run has one."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    while True:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        if all(tr.state is not None and tr.state.is_final() for tr in runs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    attempts: dict[int, list] = {}
    for tr in sorted(runs, key=lambda tr: (tr.flow_run_run_count, tr.expected_start_time)):
        attempts.setdefault(tr.flow_run_run_count, []).append((tr.name.rsplit("-", 1)[0],
                                                               tr.state.name if tr.state else None))
    return attempts


def read_artifact(client, key: str, run_id: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                                 flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert found, f"no artifact {key!r} for flow run {run_id}"
    return found[-1]


@pytest.mark.slow
def test_nightly_of_the_branch_head_fail_retry_cached_cancel_resume_trend_and_alerts(shared_data, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import State, StateType

    # A team's repository: `origin` (bare) holds branch main, the worker's checkout `repo` deploys from it and
    # stays at the first commit, and a developer pushes to main between nights from `dev`.
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT, repo, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache",
                                                                   "wandb", ".venv", "s1.json", "s2.json"))
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "deployments" / "baselines" / "e2e-nightly.yaml").write_text(yaml.safe_dump(  # the gate, loose at first
        {"preset": "smoke", "metrics": {"min_val_bpb": {"value": 3.0, "tolerance": 10.0}}}))
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "night 1", cwd=repo)
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(origin)], check=True, timeout=120)
    git("remote", "add", "origin", str(origin), cwd=repo)
    dev = tmp_path / "dev"
    subprocess.run(["git", "clone", "-q", str(origin), str(dev)], check=True, timeout=120)
    first = git("rev-parse", "--short=7", "HEAD", cwd=repo)

    chat_data = tmp_path / "chat_eval"
    shutil.copytree(shared_data / "chat_eval", chat_data)
    gsm8k = chat_data / "gsm8k" / "test.jsonl"
    gsm8k.unlink()  # not downloaded yet: the chat_eval stage will fail on it
    bundle = small_bundle(shared_data, tmp_path / "bundle")
    shrunk = {**SHRINK, "chat_eval.data_dir": str(chat_data), "base_eval.bundle": str(bundle)}
    # speedrun/nightly with the smoke preset: every stage refreshed (the deployment's default), gated
    nightly = {"preset": "smoke", "mirror": str(shared_data),
               "overrides": {**shrunk, "report.regression": True, "report.baseline": "e2e-nightly"}}
    store = tmp_path / "store"

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SPEEDRUN_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api, DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", WANDB_MODE="offline")
    env.pop("PYTHONPATH", None)  # the worker imports what it runs from its working directory, as a real one does
    # The nightly cron must not start d24 runs here; its schedule is checked through the API instead.
    # The event persister (the events table: the UI's event feed) is off: nothing here reads it back, and on SQLite
    # its writes race the trigger service's, which can drop an alert (deployments/automations/README.md).
    server_env = {**env, "PREFECT_API_SERVICES_SCHEDULER_ENABLED": "false",
                  "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false"}
    nightly_dir = tmp_path / "nightly"
    nightly_dir.mkdir()
    worker_env = {**env, "SPEEDRUN_PROJECT_DIR": str(repo), "SPEEDRUN_HOME": str(store),
                  "SPEEDRUN_REPOSITORY": str(origin), "SPEEDRUN_NIGHTLY_DIR": str(nightly_dir),
                  "PREFECT_WORKER_QUERY_SECONDS": "2"}

    server_log = tmp_path / "server.log"
    with background(["server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off"],
                    server_env, repo, server_log, signal.SIGTERM) as server, \
            temporary_settings({PREFECT_API_URL: api}):
        wait_healthy(api, server, server_log)
        prefect("work-pool", "create", POOL, "--type", "process", env=env, cwd=repo)
        prefect("work-pool", "set-concurrency-limit", POOL, "1", env=env, cwd=repo)
        prefect("work-pool", "create", "speedrun-sweeps", "--type", "process", env=env, cwd=repo)
        prefect("deploy", "--all", env=env, cwd=repo)
        hook = Webhook()
        subprocess.run([sys.executable, "-m", "deployments.automations.nightly_alert", "--webhook-url", hook.url],
                       cwd=repo, env=env, check=True, capture_output=True, timeout=120)

        with get_client(sync_client=True) as client:
            deployments = {d.name: d for d in client.read_deployments()}
            assert set(deployments) == DEPLOYMENTS | SWEEPS
            assert {d.name for d in deployments.values() if d.work_pool_name == POOL} == DEPLOYMENTS
            assert {d.version for d in deployments.values()} == {git("rev-parse", "--short=8", "HEAD", cwd=repo)}
            assert deployments["d26"].parameters == {"preset": "d26"}
            assert deployments["smoke"].pull_steps == [{"prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $SPEEDRUN_PROJECT_DIR }}"}}]  # no machine path in what was deployed
            assert deployments["nightly"].parameters == {"preset": "d24", "refresh": ["all"],
                                                         "overrides": {"report.regression": True}}
            assert [(s.schedule.cron, s.active) for s in deployments["nightly"].schedules] == [("0 2 * * *", True)]
            assert client.read_work_pool(POOL).concurrency_limit == 1

            worker_log = tmp_path / "worker.log"
            with background(["worker", "start", "--pool", POOL, "--limit", "1", "--name", "e2e"], worker_env, repo,
                            worker_log, signal.SIGINT):
                # 1. night 1 fails in chat_eval: a real missing input, after every earlier stage completed
                night1 = run_deployment(nightly, env, repo, "nightly")
                run = wait_final(client, night1, worker_log=worker_log)
                assert run.state.type == StateType.FAILED, worker_log.read_text()[-5000:]
                failed_at = STAGES.index("chat_eval")
                assert stage_runs(client, night1)[1] == [(s, "Completed") for s in STAGES[:failed_at]] + \
                    [("chat_eval", "Failed")]
                assert "gsm8k" in run.state.message and "test.jsonl" in run.state.message
                wait_for_body(hook, night1, "Failed")  # the failure alert

                # 2. fix the cause, then Retry exactly as the UI does: the stages refreshed by the first attempt
                # are not rebuilt again
                shutil.copy2(shared_data / "chat_eval" / "gsm8k" / "test.jsonl", gsm8k)
                wait_process_reaped(client, night1)
                accepted = client.set_flow_run_state(night1, State(type=StateType.SCHEDULED, name="AwaitingRetry",
                                                                   message="Retry from the UI"), force=True)
                assert accepted.status.value == "ACCEPT"
                run = wait_final(client, night1, worker_log=worker_log)
                assert run.state.type == StateType.COMPLETED, worker_log.read_text()[-5000:]
                assert run.run_count == 2
                assert stage_runs(client, night1)[2] == [(s, "Cached") for s in STAGES[:failed_at]] + \
                    [(s, "Completed") for s in STAGES[failed_at:]]
                history = [s.name for s in client.read_flow_run_states(night1)]
                assert history.count("Failed") == 1 and "AwaitingRetry" in history and history[-1] == "Completed"
                assert re.fullmatch(rf"smoke-{first}-\d{{8}}-\d{{4}}", run.name), run.name  # the pulled commit
                assert run.state.message.startswith(f"PASS smoke@{first}") and "min_val_bpb" in run.state.message
                wait_for_body(hook, night1, "PASS smoke@")  # the success notification carries the verdict line

                # the report, summary and submission landed in the store, and the report is a Prefect artifact
                (report_dir,) = [p.parent for p in store.glob("stages/report/*/manifest.json")]
                summary = json.loads((report_dir / "summary.json").read_text())
                assert summary["step"] == 10 and summary["preset"] == "smoke"
                assert summary["min_val_bpb"] > 0 and -1 <= summary["core_metric"] <= 1
                assert summary["chatcore"] is not None
                assert "| time (hours) |" in (report_dir / "submission.md").read_text()
                assert (report_dir / "val_bpb.png").read_bytes()[:4] == b"\x89PNG"
                report_md = (report_dir / "report.md").read_text()
                published = artifacts_of(client, night1)
                assert "](data:image/png;base64,iVBORw0KGgo" in published["speedrun-smoke-report"]
                assert published["speedrun-smoke-report"].split("![val bpb]")[0] == report_md.split("![val bpb]")[0]
                assert sorted(row["task"] for row in published["speedrun-smoke-core"]) == sorted(CORE_TASKS)
                assert published["pretrain-progress"] == 100

                # 3. the same run from the worker's own checkout (speedrun/smoke; same commit): every stage Cached
                again = run_deployment({k: v for k, v in nightly.items() if k != "refresh"}, env, repo)
                assert wait_final(client, again, worker_log=worker_log).state.type == StateType.COMPLETED
                assert stage_runs(client, again) == {1: [(s, "Cached") for s in STAGES]}

                # 4. Cancel mid-pretrain, as the UI's Cancel does: the ranks finish their step and save it; Retry
                # resumes from that step and ends bitwise where an uninterrupted run ends.
                longer = {"mirror": str(shared_data), "until": "pretrain",
                          "overrides": {**shrunk, "pretrain.num_iterations": 16, "pretrain.save_every": -1}}
                cancelled = run_deployment(longer, env, repo)
                work = wait_for_log_line(store, "step 00005/00016", worker_log)
                client.set_flow_run_state(cancelled, State(type=StateType.CANCELLING, name="Cancelling"), force=True)
                run = wait_final(client, cancelled, worker_log=worker_log)
                assert run.state.type == StateType.CANCELLED, run.state
                checkpoints = work / "run" / "checkpoints"
                saved = sorted(int(p.name.removeprefix("complete_")) for p in checkpoints.glob("complete_*"))
                assert saved and 5 <= saved[-1] < 16, saved  # the step in flight, saved on the way out
                assert not (work.parent / "manifest.json").exists()
                wait_process_reaped(client, cancelled)
                client.set_flow_run_state(cancelled, State(type=StateType.SCHEDULED, name="AwaitingRetry"), force=True)
                run = wait_final(client, cancelled, worker_log=worker_log)
                assert run.state.type == StateType.COMPLETED, worker_log.read_text()[-5000:]
                assert f"resuming from step {saved[-1]} " in (work / "log.txt").read_text()
                straight = run_deployment({**longer, "store": str(tmp_path / "store-straight")}, env, repo)
                assert wait_final(client, straight, worker_log=worker_log).state.type == StateType.COMPLETED
                (straight_art,) = (tmp_path / "store-straight").glob("stages/pretrain/*/manifest.json")
                model = "checkpoint/model_000016.pt"
                assert json.loads(straight_art.read_text())["files"][model]["sha256"] == \
                    json.loads((work.parent / "manifest.json").read_text())["files"][model]["sha256"]

                # 5. a developer records night 1 as the baseline, val bpb curve included, and pushes: night 2
                # pulls that commit, rebuilds every stage and passes the curve at every eval step
                subprocess.run([sys.executable, "-m", "tasks.verdict", "--write-baseline", "e2e-nightly",
                                str(report_dir / "summary.json")], cwd=dev, env=env, check=True, capture_output=True,
                               timeout=120)
                baseline_file = dev / "deployments" / "baselines" / "e2e-nightly.yaml"
                baseline = yaml.safe_load(baseline_file.read_text())
                baseline["metrics"].pop("total_training_time", None)  # wall time on a shared CI box is noise
                baseline_file.write_text(yaml.safe_dump(baseline))
                second = commit_and_push(dev, "night 2: record the baseline")
                night2 = run_deployment(nightly, env, repo, "nightly")
                run = wait_final(client, night2, worker_log=worker_log)
                assert run.state.type == StateType.COMPLETED, worker_log.read_text()[-5000:]
                assert re.fullmatch(rf"smoke-{second}-\d{{8}}-\d{{4}}", run.name), run.name
                assert stage_runs(client, night2) == {1: [(s, "Completed") for s in STAGES]}
                night_runs = {night1: client.read_flow_run(night1).name, night2: run.name}

                # two nights: two history entries with their commits, a trend of two rows, two wandb runs
                entries = [json.loads(line) for line in (store / "history" / "smoke.jsonl").read_text().splitlines()]
                assert [e["commit"][:7] for e in entries] == [first, second], entries
                trend = artifacts_of(client, night2)["speedrun-nightly-trend"]
                assert [row["commit"][:7] for row in trend] == [first, second]
                (report2,) = [p.parent for p in store.glob("stages/report/*/manifest.json")
                              if json.loads((p.parent / "summary.json").read_text())["commit"].startswith(second)]
                assert (report2 / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                for run_id, name in night_runs.items():
                    (wandb_run,) = (store / "wandb").glob(f"offline-run-*-smoke-pretrain-{run_id[:8]}")
                    assert name.encode() in next(wandb_run.glob("run-*.wandb")).read_bytes()  # grouped by run

                # 6. a commit whose baseline curve leaves the band at one eval step: the gate names that step,
                # on every run (a failed report is never cached), and the alert carries it
                steps = baseline["val_bpb_curve"]["steps"]
                step = sorted(steps)[len(steps) // 2]
                steps[step] += 1.0
                baseline_file.write_text(yaml.safe_dump(baseline))
                commit_and_push(dev, "night 3: a curve the run cannot meet")
                for _ in range(2):
                    regressed = run_deployment({**nightly, "refresh": []}, env, repo, "nightly")
                    run = wait_final(client, regressed, worker_log=worker_log)
                    assert run.state.type == StateType.FAILED
                    assert stage_runs(client, regressed) == {1: [(s, "Cached") for s in STAGES[:-1]] +
                                                             [("report", "Failed")]}
                    assert "RegressionDetected" in run.state.message and f"step {step}" in run.state.message
                assert f"step {step}" in wait_for_body(hook, regressed, "Failed")

                # 7. a pull that fails (the branch is gone) fails the run before any stage, saying why
                git("branch", "-m", "main", "gone", cwd=origin)
                unpulled = run_deployment(nightly, env, repo, "nightly")
                run = wait_final(client, unpulled, worker_log=worker_log)
                assert run.state.type == StateType.FAILED, run.state
                assert "branch 'main' does not exist in" in run.state.message and str(origin) in run.state.message
                assert stage_runs(client, unpulled) == {}
