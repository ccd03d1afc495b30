"""The speedrun flow end to end on the smoke preset with real shards: caching, refresh, rebuilds.

In-process runs share one temporary Prefect server. The CLI as a user runs it (subprocesses, embedded Prefect,
signals): tests/test_flow_cli.py.
"""

import http.server
import json
import os
import re
import shutil
import threading
from functools import partial
from pathlib import Path

import pytest

from flows.speedrun import speedrun, stages_to_refresh
from tasks.shard_source import ShardSourceError
from model.files import sha256_file
from tasks.store import read_manifest

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
    def _run(until="pretrain", mirror=None, overrides=None, **kwargs):
        result = speedrun(preset="smoke", mirror=str(mirror or shared_data), store=str(tmp_path / "store"),
                          until=until, overrides={**_run.overrides, **(overrides or {})}, **kwargs)
        _run.last = result
        return {name: s["state"] for name, s in result["stages"].items()}
    _run.store = tmp_path / "store"
    _run.overrides = {}  # every run's overrides start from these
    return _run


# What re-executes is the point of the cache tests, not the training: 6 steps instead of smoke's 20, with an
# evaluation and a checkpoint on the way.
SHORT = {"pretrain.num_iterations": 6, "pretrain.eval_every": 3, "pretrain.save_every": 3}


@pytest.fixture(scope="module")
def built_store(prefect_server, shared_data, tmp_path_factory) -> Path:
    """A smoke store (SHORT) built once up to pretrain, for the tests that start from a built store (copied per
    test)."""
    store = tmp_path_factory.mktemp("built") / "store"
    speedrun(preset="smoke", mirror=str(shared_data), store=str(store), until="pretrain", overrides=SHORT)
    return store


@pytest.fixture
def built(run, built_store):
    """`run` (SHORT) over a copy of the built store (mtimes kept, so validation trusts it), run once: all Cached."""
    shutil.copytree(built_store, run.store, symlinks=True)
    run.overrides = SHORT
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


def test_lost_pretrain_artifact_is_rebuilt_bitwise_and_what_reads_it_stays_cached(built):
    """Rebuilt with bitwise the same weights (CPU, fixed seed): its timings and log differ, but they are not part
    of its content, so the stages after it stay Cached."""
    run = built
    bpb_only = {"base_eval.eval": "bpb"}  # a stage that reads the weights, cheaply
    assert run(until="base_eval", overrides=bpb_only) == expect("Cached", until="base_eval", base_eval="Completed")
    pre = artifact(run, "pretrain")
    weights = sha256_file(pre / "checkpoint" / "model_000006.pt")
    shutil.rmtree(pre)
    assert run(until="base_eval", overrides=bpb_only) == expect("Cached", until="base_eval", pretrain="Completed")
    assert sha256_file(pre / "checkpoint" / "model_000006.pt") == weights


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
    after = speedrun(preset="smoke", mirror=str(shared_data), store=str(tmp_path / "new"), until="pretrain",
                     overrides=SHORT)
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
