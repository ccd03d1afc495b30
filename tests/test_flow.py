"""The speedrun flow end to end on the smoke preset with real shards: caching, refresh, rebuilds.

In-process runs share one temporary Prefect server; the CLI tests run `python -m flows.speedrun` in
subprocesses (embedded Prefect), from a copy of the repo where a test edits source files.
"""

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from flows.speedrun import speedrun, stages_to_refresh
from test_deployment_e2e import SHRINK, small_bundle
from tasks.shard_source import ShardSourceError
from model.files import sha256_file
from tasks.store import WORK, read_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES_RUN = ("shards", "tokenizer", "eval_bundle", "pretrain", "base_eval", "sft", "chat_eval", "report")


def expect(default: str, until: str | None = "pretrain", **states: str) -> dict:
    """Expected {stage: state}: `default` for every stage the flow runs (up to `until`), except those named."""
    stages = STAGES_RUN if until is None else STAGES_RUN[:STAGES_RUN.index(until) + 1]
    return {stage: states.get(stage, default) for stage in stages}


@pytest.fixture
def run(prefect_server, shared_data, tmp_path):
    """Run the smoke speedrun against a fresh store; returns {stage: state} and keeps the last result.

    Runs stop after pretrain unless told otherwise: the cache mechanics do not need CORE every time.
    """
    def _run(until="pretrain", mirror=None, **kwargs):
        result = speedrun(preset="smoke", mirror=str(mirror or shared_data), store=str(tmp_path / "store"),
                          until=until, **kwargs)
        _run.last = result
        return {name: s["state"] for name, s in result["stages"].items()}
    _run.store = tmp_path / "store"
    return _run


@pytest.fixture(scope="module")
def built_store(prefect_server, shared_data, tmp_path_factory) -> Path:
    """A smoke store built once up to pretrain, for the tests that start from a built store (copied per test)."""
    store = tmp_path_factory.mktemp("built") / "store"
    speedrun(preset="smoke", mirror=str(shared_data), store=str(store), until="pretrain")
    return store


@pytest.fixture
def built(run, built_store):
    """`run` over a copy of the built store (mtimes kept, so validation trusts it), run once: all Cached."""
    shutil.copytree(built_store, run.store, symlinks=True)
    assert run() == expect("Cached")
    return run


def artifact(run, stage: str) -> Path:
    return Path(run.last["stages"][stage]["artifact"])


FEW_CHAT_PROBLEMS = {"chat_eval.max_problems": 4}  # chat generation dominates a smoke run; every path still runs


def test_first_run_completes_and_rerun_is_cached(run):
    assert run(until=None, overrides=FEW_CHAT_PROBLEMS) == expect("Completed", until=None)
    first = run.last
    tok = artifact(run, "tokenizer")
    assert {"tokenizer.tiktoken", "tokenizer.json", "token_bytes.pt", "tok_eval.json", "manifest.json"} <= \
        {p.name for p in tok.iterdir()}
    assert first["summary"]["vocab_size"] == 1024 and first["summary"]["train_shards"] == 2
    pre = artifact(run, "pretrain")
    assert {"summary.json", "metrics.jsonl", "log.txt"} <= {p.name for p in pre.iterdir()}
    assert (pre / "checkpoint" / "model_000020.pt").is_file() and (pre / "checkpoint" / "optim_000020_rank0.pt").is_file()
    summary = first["summary"]
    for key in ("total_training_time", "total_training_flops", "min_val_bpb", "step", "mfu", "tok_per_sec"):
        assert key in summary
    assert summary["step"] == 20
    assert summary["attention_backend"] == "sdpa"  # said and recorded by the entry point (CPU: SDPA)
    trained = json.loads((pre / "summary.json").read_text())
    assert trained["attention_backend"] == "sdpa" and "CPU" in trained["attention_reason"].upper()
    assert read_manifest(pre)["environment"]["attention_backend"] == "sdpa"
    bpb = [m["val/bpb"] for m in map(json.loads, (pre / "metrics.jsonl").read_text().splitlines()) if "val/bpb" in m]
    assert len(bpb) == 3 and bpb[0] - 0.4 > bpb[1] > bpb[2] + 0.1, bpb  # smoke learns clearly: 4.15, 3.24, 2.99
    assert summary["core_tasks"] == "21/22" and summary["missing_tasks"] == ["coqa"]  # the mirror lacks coqa
    assert -1.0 <= summary["core_metric"] <= 1.0 and summary["val_bpb"] > 0
    evaluated = artifact(run, "base_eval")
    assert {"summary.json", "core.json", "base_model_000020.csv", "log.txt"} <= {p.name for p in evaluated.iterdir()}
    sft = artifact(run, "sft")
    assert (sft / "checkpoint" / "model_000020.pt").is_file() and (sft / "tokenizer" / "tokenizer.json").is_file()
    assert summary["sft_step"] == 20 and summary["sft_min_val_bpb"] > 0
    assert set(summary["chat_accuracy"]) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"}
    assert all(0.0 <= a <= 1.0 for a in summary["chat_accuracy"].values())
    assert summary["chatcore"] is not None
    report = artifact(run, "report")
    assert {"report.md", "summary.json", "submission.md"} <= {p.name for p in report.iterdir()}
    assert json.loads((report / "summary.json").read_text())["core_metric"] == summary["core_metric"]
    assert_visible_in_the_ui(first, run.store, pre)
    assert run(until=None, overrides=FEW_CHAT_PROBLEMS) == expect("Cached", until=None)
    assert {k: v["key"] for k, v in run.last["stages"].items()} == {k: v["key"] for k, v in first["stages"].items()}

    # A lost pretrain artifact is rebuilt with bitwise the same weights (CPU, fixed seed): its timings and log
    # differ, but they are not part of its content, so every stage after it stays Cached.
    weights = sha256_file(pre / "checkpoint" / "model_000020.pt")
    shutil.rmtree(pre)
    assert run(until=None, overrides=FEW_CHAT_PROBLEMS) == expect("Cached", until=None, pretrain="Completed")
    assert sha256_file(pre / "checkpoint" / "model_000020.pt") == weights


def assert_visible_in_the_ui(result: dict, store: Path, pretrain: Path) -> None:
    """What the Prefect UI shows of a finished run: its name, the stages' task runs, the training progress,
    each stage's result, the trend; and the run's own wandb runs and history entry."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    flow_run_id = result["flow_run"]
    with get_client(sync_client=True) as client:
        name = client.read_flow_run(flow_run_id).name
        task_runs = {tr.name for tr in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}
        artifacts = {}
        for a in sorted(client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))), key=lambda a: a.created):
            artifacts[a.key] = a.data  # the newest version of each key
    assert re.fullmatch(r"smoke-([0-9a-f]{7}(-dirty)?|nogit)-\d{8}-\d{4}", name), name
    assert {f"{stage}-{result['stages'][stage]['key'][:8]}" for stage in STAGES_RUN} == task_runs
    assert artifacts["pretrain-progress"] == 100 and artifacts["sft-progress"] == 100
    assert "| step | 20 / 20 (100.0%) |" in artifacts["pretrain-status"]
    assert {f"{stage.replace('_', '-')}-result" for stage in STAGES_RUN} <= set(artifacts)
    assert f"`{pretrain}`" in artifacts["pretrain-result"] and "min_val_bpb" in artifacts["pretrain-result"]
    trend = artifacts["speedrun-smoke-trend"]
    trend = json.loads(trend) if isinstance(trend, str) else trend
    history = [json.loads(line) for line in (store / "history" / "smoke.jsonl").read_text().splitlines()]
    assert len(trend) == len(history) == 1 and trend[0]["commit"] == history[0]["commit"]
    assert history[0]["min_val_bpb"] == result["summary"]["min_val_bpb"] and history[0]["hardware"] == "cpu"
    assert "](data:image/png;base64," in artifacts["speedrun-smoke-report"]
    # one wandb run per flow run and stage, grouped by flow run
    (wandb_run,) = (store / "wandb").glob("offline-run-*-smoke-pretrain-*")  # in the store: outlives rebuilds
    assert wandb_run.name.endswith(f"-smoke-pretrain-{flow_run_id[:8]}"), wandb_run.name
    assert name.encode() in next(wandb_run.glob("run-*.wandb")).read_bytes()  # its group: the flow run's name
    report_md = (Path(result["stages"]["report"]["artifact"]) / "report.md").read_text()
    assert f"wandb sync {wandb_run}" in report_md and "## Trend: the last 1 smoke runs" in report_md


def test_tokenizer_option_reexecutes_tokenizer_only(built):
    run = built
    old_key = run.last["stages"]["tokenizer"]["key"]
    retrained = expect("Cached", tokenizer="Completed", pretrain="Completed")
    assert run(overrides={"tokenizer.vocab_size": 768}) == retrained
    assert run.last["stages"]["tokenizer"]["key"] != old_key
    assert run.last["summary"]["vocab_size"] == 768


def test_deleted_artifact_file_is_rebuilt(built):
    run = built
    token_bytes = artifact(run, "tokenizer") / "token_bytes.pt"
    original = sha256_file(token_bytes)
    token_bytes.unlink()
    # Same key and directory; a deterministic rebuild keeps the content hash, so pretrain stays Cached.
    assert run() == expect("Cached", tokenizer="Completed")
    assert sha256_file(token_bytes) == original


def test_flipped_byte_in_the_tokenizer_rebuilds_it_and_nothing_else(built):
    """Same size, other bytes: the changed mtime makes validation re-hash the file; the deterministic rebuild
    gives the same content, so pretraining stays Cached."""
    run = built
    ranks = artifact(run, "tokenizer") / "tokenizer.tiktoken"
    original = ranks.read_bytes()
    data = bytearray(original)
    data[100] ^= 0x01
    ranks.write_bytes(bytes(data))
    assert run() == expect("Cached", tokenizer="Completed")
    assert ranks.read_bytes() == original


def test_moved_store_is_all_cached_with_every_path_under_the_new_root(built, shared_data, tmp_path):
    """Records and manifests hold paths relative to the store root: a store moved (or mounted elsewhere) is
    still one cache."""
    before = built.last
    shutil.move(built.store, tmp_path / "new")
    after = speedrun(preset="smoke", mirror=str(shared_data), store=str(tmp_path / "new"), until="pretrain")
    assert {k: v["state"] for k, v in after["stages"].items()} == expect("Cached")
    assert {k: v["key"] for k, v in after["stages"].items()} == {k: v["key"] for k, v in before["stages"].items()}
    assert all(Path(v["artifact"]).is_relative_to(tmp_path / "new") and Path(v["artifact"]).is_dir()
               for v in after["stages"].values())


def test_deleted_shard_is_refetched_and_downstream_stays_cached(built):
    run = built
    shard = Path(json.loads((artifact(run, "shards") / "shards.json").read_text())["train"][0])
    shard = (artifact(run, "shards") / shard).resolve()
    shard.unlink()
    # The shard comes back with the same bytes, so the tokenizer's inputs (content hashes) are unchanged.
    assert run() == expect("Cached", shards="Completed")
    assert shard.is_file()


def test_garbled_shard_in_store_is_detected_and_refetched(built, shared_data):
    run = built
    shard = artifact(run, "shards").parent.parent.parent / "shards"
    victim = next(shard.rglob("shard_00001.parquet"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2: len(data) // 2 + 65536] = os.urandom(65536)  # same size, corrupt pages
    victim.write_bytes(bytes(data))
    assert run() == expect("Cached", shards="Completed")
    assert sha256_file(victim) == sha256_file(shared_data / "pretrain" / "shard_00001.parquet")


def test_external_inputs_are_keyed_by_what_they_hold(run, shared_data, tmp_path):
    """A mirror edited in place: a replaced shard re-executes shards and what reads them, an edited bundle file
    the eval bundle; `--refresh shards` re-hashes stored shards the size-and-mtime check would trust."""
    mirror = tmp_path / "mirror"
    SHORT = {"pretrain.num_iterations": 6}  # what re-executes is the point, not the training
    mirror.mkdir()
    shutil.copytree(shared_data / "pretrain", mirror / "pretrain")
    shutil.copytree(shared_data / "eval_bundle", mirror / "eval_bundle")
    for name in ("sft", "chat_eval"):
        (mirror / name).symlink_to(shared_data / name)
    assert run(mirror=mirror, overrides=SHORT) == expect("Completed")
    meta = mirror / "eval_bundle" / "eval_meta_data.csv"
    meta.chmod(0o644)
    meta.write_text(meta.read_text() + "\n")
    assert run(mirror=mirror, overrides=SHORT) == expect("Cached", eval_bundle="Completed")  # CORE is off during smoke training
    shard = mirror / "pretrain" / "shard_00000.parquet"
    shard.chmod(0o644)
    shutil.copy(shared_data / "pretrain" / "shard_00003.parquet", shard)  # another valid shard, same name
    assert run(mirror=mirror, overrides=SHORT) == expect("Completed", eval_bundle="Cached")
    stored = artifact(run, "shards") / json.loads((artifact(run, "shards") / "shards.json").read_text())["train"][0]
    assert sha256_file(stored) == sha256_file(shared_data / "pretrain" / "shard_00003.parquet")
    # Bytes changed under an unchanged size and mtime, where decoding cannot see it (the writer's name).
    st = stored.stat()
    stored.write_bytes(stored.read_bytes().replace(b"parquet-cpp-arrow", b"parquet-cpp-arroW"))
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run(mirror=mirror, until="shards", overrides=SHORT) == expect("Cached", until="shards")  # trusted by size and mtime
    assert run(mirror=mirror, until="shards", refresh=["shards"], overrides=SHORT) == expect("Completed", until="shards")
    assert sha256_file(stored) == sha256_file(shared_data / "pretrain" / "shard_00003.parquet")


def test_refresh_reexecutes_stage_and_downstream(built):
    run = built
    keys = {k: v["key"] for k, v in run.last["stages"].items()}
    assert run(refresh=["pretrain"]) == expect("Cached", pretrain="Completed")
    assert run(refresh=["tokenizer"]) == expect("Cached", tokenizer="Completed", pretrain="Completed")
    assert {k: v["key"] for k, v in run.last["stages"].items()} == keys  # same inputs, same keys
    assert run() == expect("Cached")


def test_lost_cache_record_reuses_valid_artifact(built):
    run = built
    manifest_before = read_manifest(artifact(run, "tokenizer"))
    shutil.rmtree(run.store / "prefect-results")
    assert run() == expect("Completed")
    assert read_manifest(artifact(run, "tokenizer")) == manifest_before  # reused, not rebuilt
    assert run() == expect("Cached")


@pytest.fixture(scope="module")
def http_mirror(shared_data):
    """A real HTTP server on 127.0.0.1 serving ../shared/data (directory listings included)."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(shared_data))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_source_fetches_shards_and_resolves_val_shard(run, http_mirror, shared_data):
    source = f"{http_mirror}/pretrain"  # the tokenizer reads what was fetched; later stages read it as any shards
    assert run(until="tokenizer", overrides={"data.source": source}) == expect("Completed", until="tokenizer")
    index = json.loads((artifact(run, "shards") / "shards.json").read_text())
    assert index["source"] == source and index["val"].endswith("shard_00007.parquet")  # highest index served
    val = (artifact(run, "shards") / index["val"]).resolve()
    assert sha256_file(val) == sha256_file(shared_data / "pretrain" / "shard_00007.parquet")
    assert run(until="tokenizer", overrides={"data.source": source}) == expect("Cached", until="tokenizer")


def test_missing_source_fails_the_shards_stage_with_the_url(run, http_mirror):
    source = f"{http_mirror}/nowhere/shard_{{index:05d}}.parquet"
    with pytest.raises(ShardSourceError, match=r"shard \d+ is not available from http://127\.0\.0\.1:\d+/nowhere/"):
        run(overrides={"data.source": source, "data.val_shard": 7})


def test_a_flow_past_its_time_limit_starts_no_stage(run):
    # A limit already used up: the first stage does not start, and the message says which option to raise.
    # (A torchrun stage running when the limit passes is stopped: tests/test_launch.py.)
    from flows.speedrun import FlowTimeLimitReached

    with pytest.raises(FlowTimeLimitReached, match=r"time limit of 1e-06 s before stage shards "
                                                   r"\(runtime.flow_timeout_s"):
        run(overrides={"runtime.flow_timeout_s": 1e-6})
    assert not (run.store / "stages").exists()


def test_refresh_closure():
    assert stages_to_refresh(None) == set()
    assert stages_to_refresh(["tokenizer"]) == {"tokenizer", "pretrain", "base_eval", "sft", "chat_eval", "report"}
    assert stages_to_refresh("chat_eval,report") == {"chat_eval", "report"}
    assert "shards" in stages_to_refresh("all")


# ---------------------------------------------------------------------------------------------
# the CLI, as a user runs it (embedded Prefect in a subprocess)

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


@pytest.mark.slow
def test_cli_summary_json_cached_rerun_and_source_edit(cli_env, shared_data, tmp_path):
    """The issue's 'done when': run, rerun all Cached; then editing the tokenizer's code re-executes it."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT, repo, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache"))
    env = {**cli_env, "PYTHONPATH": str(repo)}
    # smoke, shrunk as the deployment e2e test shrinks it (fewer steps, a 3-task CORE bundle, two problems per
    # chat task): what is tested is which stages re-execute, not the numbers
    bundle = small_bundle(shared_data, tmp_path / "bundle")
    shrink = [f"{k}={v}" for k, v in {**SHRINK, "base_eval.bundle": bundle}.items()]
    args = ("--preset", "smoke", "--mirror", str(shared_data), "--store", str(tmp_path / "store"),
            *[a for item in shrink for a in ("--set", item)])

    def states(summary: Path) -> dict:
        return {k: v["state"] for k, v in json.loads(summary.read_text())["stages"].items()}

    for i, expected in enumerate(["Completed", "Cached"]):
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
        proc = cli(repo, *args, *extra, "--summary-json", str(tmp_path / f"s{i}.json"), env=env)
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
def test_killed_refresh_leaves_the_previous_artifact_valid_and_cached(cli_env, shared_data, tmp_path):
    """A refresh builds beside the artifact it replaces: killing it mid-build loses nothing."""
    store = tmp_path / "store"
    args = ("--preset", "smoke", "--mirror", str(shared_data), "--store", str(store), "--until", "pretrain")
    first = cli(REPO_ROOT, *args, "--summary-json", str(tmp_path / "first.json"), env=cli_env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    built = Path(json.loads((tmp_path / "first.json").read_text())["stages"]["pretrain"]["artifact"])
    manifest = read_manifest(built)

    refresh = subprocess.Popen([sys.executable, "-m", "flows.speedrun", *args, "--refresh", "pretrain"], cwd=REPO_ROOT,
                               env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        rebuilding = built.with_name(built.name + ".rebuild") / "work" / "run" / "checkpoints" / "complete_000010"
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
    again = cli(REPO_ROOT, *args, "--summary-json", str(tmp_path / "again.json"), env=cli_env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    result = json.loads((tmp_path / "again.json").read_text())
    assert result["stages"]["pretrain"] == {**result["stages"]["pretrain"], "state": "Cached", "artifact": str(built)}


def test_cli_rejects_unknown_until_stage(cli_env, tmp_path):
    proc = cli(REPO_ROOT, "--preset", "smoke", "--until", "pretrian", "--store", str(tmp_path / "store"), env=cli_env)
    assert proc.returncode == 2 and "until" in proc.stderr and "pretrain" in proc.stderr
    assert not (tmp_path / "store").exists()
