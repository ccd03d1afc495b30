"""bench/gpu_check.py --cpu: the GPU check runs every one of its checks at tiny sizes, so it cannot rot
before the first GPU session runs it for real. It is run the way a user runs it on the GPU host: a plain
script with a tokenizer directory and a shard directory, printing one JSON, exit status 0 when all pass."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"environment", "gpt_fp32", "gpt_float32", "attention", "fp8_linear", "engine_greedy", "train_speed",
          "core_speed", "engine_speed"}


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory):
    """A small real tokenizer and a shard directory (two train shards, the last shard as validation)."""
    from model.data import iter_documents
    from model.tokenizer import train_tokenizer, training_texts

    shards = sorted((shared_data / "pretrain").glob("shard_*.parquet"))
    data_dir = tmp_path_factory.mktemp("shards")
    for shard in shards[:1] + shards[-1:]:
        (data_dir / shard.name).symlink_to(shard)
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(training_texts(iter_documents(shards[:1]), 500_000, 10_000), 512).save(tokenizer_dir)
    return tokenizer_dir, data_dir


def test_gpu_check_cpu_mode_passes_every_check(inputs, tmp_path):
    tokenizer_dir, data_dir = inputs
    out = tmp_path / "gpu_check.json"
    script = str(REPO_ROOT / "bench" / "gpu_check.py")
    proc = subprocess.run([sys.executable, script, "--cpu", f"--tokenizer-dir={tokenizer_dir}",
                           f"--data-dir={data_dir}", f"--out={out}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # run from outside the repo
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads(out.read_text())
    assert report["ok"] and report["failed"] == [] and report["mode"] == "cpu"
    checks = report["checks"]
    assert set(checks) == CHECKS
    assert all(check["ok"] for check in checks.values())
    assert checks["environment"]["attention_backend"] == "sdpa" and checks["environment"]["attention_reason"]
    assert set(checks["attention"]["backends"]) == {"sdpa", "flex"}
    assert checks["fp8_linear"]["rel_err"]["forward"] < 0.08
    assert checks["core_speed"]["decisions_equal"] and checks["core_speed"]["prefix_shared"] > 0
    assert checks["train_speed"]["bf16"]["finite"] and checks["train_speed"]["bf16"]["tok_per_sec"] > 0
    assert all(row["equal"] for row in checks["engine_greedy"]["prompts"])


def test_gpu_check_exits_nonzero_and_names_the_failed_check(inputs, tmp_path):
    """A check that fails (here: a data directory without shards) makes the exit status 1 and is named."""
    tokenizer_dir, _ = inputs
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--cpu",
                           f"--tokenizer-dir={tokenizer_dir}", f"--data-dir={empty}", "--only=environment,engine_speed"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["failed"] == ["engine_speed"] and report["checks"]["environment"]["ok"]
    assert "shard" in report["checks"]["engine_speed"]["error"]
