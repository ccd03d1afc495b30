"""The speedrun CLI as a user runs it: `python -m flows.speedrun` in subprocesses, on embedded Prefect (or the
test server, where a test needs one to outlive the flow or a run only sets the stage up), with real shards on the
smoke preset.

Bad options fail before Prefect starts; a run and its rerun (all Cached) write --summary-json; edits to the
code a stage runs re-execute that stage only; a SIGKILLed flow leaves no trainer behind and its retry resumes;
a killed refresh loses nothing.
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

from test_deployment_e2e import SHRINK, small_bundle
from test_flow import REPO_ROOT, expect
from tasks.store import WORK, read_manifest


def cli(cwd: Path, *args: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.speedrun", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), SPEEDRUN_HOME=str(tmp_path_factory.mktemp("speedrun-home")))
    return env


def test_cli_rejects_bad_config_before_starting_prefect(cli_env, tmp_path):
    t0 = time.time()
    proc = cli(REPO_ROOT, "--preset", "smoke", "--set", "pretrain.depth=0", "--set", "tokenizer.vocab_sise=5",
               "--store", str(tmp_path / "store"), env=cli_env)
    assert proc.returncode == 2
    assert "pretrain.depth" in proc.stderr and "tokenizer.vocab_sise" in proc.stderr and "fix" in proc.stderr
    assert "did you mean tokenizer.vocab_size" in proc.stderr
    assert not (tmp_path / "store").exists()
    assert time.time() - t0 < 20  # no Prefect server was started


def on_test_server(env: dict) -> dict:
    """`env` pointed at the session's Prefect server. A CLI run there skips the ~8 s start of an embedded server;
    the cache lives in the store, so which server a run talks to changes no stage's state."""
    from prefect.settings import PREFECT_API_URL

    return {**env, "PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.mark.slow
def test_cli_summary_json_cached_rerun_and_source_edit(cli_env, prefect_server, shared_data, tmp_path):
    """Run (embedded Prefect, as the README's first command), rerun all Cached; then each edit to the code a stage
    runs re-executes that stage (these runs go to the test server)."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT, repo, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache"))
    embedded = {**cli_env, "PYTHONPATH": str(repo)}
    served = on_test_server(embedded)
    # smoke, shrunk as the deployment e2e test shrinks it (fewer steps, a 3-task CORE bundle, two problems per
    # chat task): what is tested is which stages re-execute, not the numbers
    bundle = small_bundle(shared_data, tmp_path / "bundle")
    shrink = [f"{k}={v}" for k, v in {**SHRINK, "base_eval.bundle": bundle}.items()]
    args = ("--preset", "smoke", "--mirror", str(shared_data), "--store", str(tmp_path / "store"),
            *[a for item in shrink for a in ("--set", item)])

    def states(summary: Path) -> dict:
        return {k: v["state"] for k, v in json.loads(summary.read_text())["stages"].items()}

    for i, (expected, env) in enumerate([("Completed", embedded), ("Cached", served)]):
        proc = cli(repo, *args, "--summary-json", str(tmp_path / f"s{i}.json"), env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert states(tmp_path / f"s{i}.json") == expect(expected, until=None)
    s0 = json.loads((tmp_path / "s0.json").read_text())
    for stage in s0["stages"].values():
        assert set(stage) == {"state", "key", "seconds", "artifact"} and Path(stage["artifact"]).is_dir()

    # An edit to the code one stage executes re-executes that stage; what reads its output re-executes only if
    # the output changed (content hashes): these edits change no bits, so everything downstream stays Cached.
    edits = [  # (file, the extra arguments of that run, the stages that re-execute)
        ("tasks/chat_eval.py", (), {"chat_eval"}),
        # CORE's scoring runs in base_eval and, through ChatCORE's shared helpers, chat_eval; smoke trains without CORE
        ("model/core_scoring.py", (), {"base_eval", "chat_eval"}),
        ("model/sft_loader.py", (), {"sft"}),  # SFT retrains to bitwise the same weights on CPU
        # the checkpoint period is not in the pretrain key; the report renders the config, so it re-renders
        (None, ("--set", "pretrain.save_every=2"), {"report"}),
    ]
    for i, (path, extra, executed) in enumerate(edits, start=2):
        if path:
            with open(repo / path, "a") as f:
                f.write("\n# an edit that changes the code fingerprint\n")
        proc = cli(repo, *args, *extra, "--summary-json", str(tmp_path / f"s{i}.json"), env=served)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert states(tmp_path / f"s{i}.json") == \
            expect("Cached", until=None, **{s: "Completed" for s in executed}), (path, extra)


def trainer_pids(marker: str) -> list[int]:
    """Pids of live torchrun launchers and ranks (model.train / model.sft) whose command line mentions `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            continue
        trainer = "torch.distributed.run" in cmdline or "-m model." in cmdline
        if proc.name.isdigit() and trainer and marker in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_sigkilled_flow_leaves_no_trainer_and_the_retry_resumes(prefect_server, shared_data, tmp_path):
    """The flow process SIGKILLed mid-pretrain (OOM killer, kill -9) on 2 ranks: torchrun and both ranks are gone
    within 10 s, having saved; the retry resumes from that checkpoint with one trainer, to the planned step."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the test server: nothing embedded to orphan
    store = tmp_path / "store"
    args = ("--preset", "smoke", "--mirror", str(shared_data), "--store", str(store), "--until", "pretrain",
            "--set", "pretrain.num_iterations=24", "--set", "runtime.nproc_per_node=2",
            "--set", "sft.total_batch_size=4096",  # a whole number of 2-rank SFT micro-batches (checked up front)
            "--set", "runtime.omp_num_threads=1")
    first = subprocess.Popen([sys.executable, "-m", "flows.speedrun", *args], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        for line in first.stdout:
            assert time.monotonic() < deadline, "pretraining reached no step 5 in time"
            if "step 00005/" in line:
                break
        assert len(trainer_pids(str(store))) == 3  # torchrun and two ranks
        first.kill()
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    deadline = time.monotonic() + 10
    while trainer_pids(str(store)):
        assert time.monotonic() < deadline, f"trainers outlived their flow: {trainer_pids(str(store))}"
        time.sleep(0.1)
    (checkpoints,) = store.glob(f"stages/pretrain/*/{WORK}/run/checkpoints")
    saved = int(sorted(checkpoints.glob("complete_*"))[-1].name.removeprefix("complete_"))
    assert saved >= 5  # told by the kernel, the ranks saved the step they were on before exiting

    retry = cli(REPO_ROOT, *args, "--summary-json", str(tmp_path / "r.json"), env=env)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["stages"]["pretrain"]["state"] == "Completed" and result["summary"]["step"] == 24
    log = (Path(result["stages"]["pretrain"]["artifact"]) / "log.txt").read_text()
    assert log.count("resuming from step ") == 1 and f"resuming from step {saved} " in log


@pytest.mark.slow
def test_killed_refresh_leaves_the_previous_artifact_valid_and_cached(cli_env, prefect_server, shared_data,
                                                                     tmp_path):
    """A refresh (embedded Prefect) builds beside the artifact it replaces: killing it mid-build loses nothing."""
    store = tmp_path / "store"
    args = ("--preset", "smoke", "--mirror", str(shared_data), "--store", str(store), "--until", "pretrain",
            "--set", "pretrain.num_iterations=12", "--set", "pretrain.save_every=4")  # killed after step 4 of 12
    served = on_test_server(cli_env)  # the runs before and after the killed one only set it up and check it
    first = cli(REPO_ROOT, *args, "--summary-json", str(tmp_path / "first.json"), env=served)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    built = Path(json.loads((tmp_path / "first.json").read_text())["stages"]["pretrain"]["artifact"])
    manifest = read_manifest(built)

    refresh = subprocess.Popen([sys.executable, "-m", "flows.speedrun", *args, "--refresh", "pretrain"], cwd=REPO_ROOT,
                               env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        rebuilding = built.with_name(built.name + ".rebuild") / "work" / "run" / "checkpoints" / "complete_000004"
        while not rebuilding.exists():
            assert refresh.poll() is None, refresh.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the refresh reached no checkpoint in time"
            time.sleep(0.1)
        assert read_manifest(built) == manifest  # while it rebuilds, the artifact is untouched and valid
        for pid in trainer_pids(str(store)):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        refresh.communicate(timeout=120)
    finally:
        if refresh.poll() is None:
            refresh.kill()
    assert refresh.returncode != 0
    assert read_manifest(built) == manifest
    again = cli(REPO_ROOT, *args, "--summary-json", str(tmp_path / "again.json"), env=served)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    result = json.loads((tmp_path / "again.json").read_text())
    assert result["stages"]["pretrain"] == {**result["stages"]["pretrain"], "state": "Cached", "artifact": str(built)}


def test_cli_rejects_unknown_until_stage(cli_env, tmp_path):
    proc = cli(REPO_ROOT, "--preset", "smoke", "--until", "pretrian", "--store", str(tmp_path / "store"), env=cli_env)
    assert proc.returncode == 2 and "until" in proc.stderr and "pretrain" in proc.stderr
    assert not (tmp_path / "store").exists()
