"""model.evaluate on a real tiny checkpoint: outputs, 2 ranks == 1 rank, and bpb against a direct computation."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_model
from model.data import read_shard_paths
from model.dataloader import BestFitLoader
from model.loss_eval import evaluate_bpb
from model.tokenizer import Tokenizer, load_token_bytes, train_tokenizer, training_texts
from model.data import iter_documents

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}


def run_module(module: str, args: list[str], nproc: int = 1, timeout: int = 600) -> str:
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, "--", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """A tokenizer and a depth-2 model trained for 30 steps by model.train itself."""
    root = tmp_path_factory.mktemp("evaluate")
    docs = iter_documents(sorted((shared_data / "pretrain").glob("shard_*.parquet"))[:1])
    train_tokenizer(training_texts(docs, max_chars=1_000_000, doc_cap=10_000), vocab_size=512).save(root / "tok")
    run_module("model.train", [
        "--depth=2", "--head-dim=64", "--max-seq-len=64", "--window-pattern=L", "--device-batch-size=8",
        "--total-batch-size=512", "--num-iterations=30", "--warmup-steps=2", "--eval-every=-1",
        "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu", "--compile=off",
        "--matrix-lr=0.1", "--embedding-lr=2.0", "--unembedding-lr=0.05",
        f"--out-dir={root / 'run'}", f"--data-dir={shared_data / 'pretrain'}", f"--tokenizer-dir={root / 'tok'}"])
    return root


def evaluate_args(trained: Path, shared_data: Path, out: Path) -> list[str]:
    return [f"--checkpoint-dir={trained / 'run' / 'checkpoints'}", f"--tokenizer-dir={trained / 'tok'}",
            f"--data-dir={shared_data / 'pretrain'}", f"--bundle-dir={shared_data / 'eval_bundle'}",
            "--allow-missing-tasks", "--max-per-task=12", "--device-batch-size=4", "--split-tokens=2048",
            "--device-type=cpu", f"--out-dir={out}"]


@pytest.mark.slow
def test_evaluate_writes_core_bpb_samples_and_two_ranks_equal_one(trained, shared_data, tmp_path):
    out1 = run_module("model.evaluate", evaluate_args(trained, shared_data, tmp_path / "one"))
    assert "CORE metric:" in out1
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert one["core_tasks"] == "21/22" and one["missing_tasks"] == ["coqa"]
    assert set(one["core_results"]) == set(one["core_centered"]) and len(one["core_results"]) == 21
    assert 0 < one["train_bpb"] < 10 and 0 < one["val_bpb"] < 10
    assert len(one["samples"]) == 7 + 8
    csv_lines = (tmp_path / "one" / "base_model_000030.csv").read_text().splitlines()
    assert csv_lines[-1].startswith("CORE") and len(csv_lines) == 1 + 21 + 1

    run_module("model.evaluate", evaluate_args(trained, shared_data, tmp_path / "two"), nproc=2)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["core_results"] == one["core_results"]  # every decision identical
    assert two["core_metric"] == pytest.approx(one["core_metric"], abs=1e-12)
    # bpb over the same tokens (2 streams of half the batches each) up to summation order
    core_one = json.loads((tmp_path / "one" / "core.json").read_text())
    core_two = json.loads((tmp_path / "two" / "core.json").read_text())
    assert core_one["decisions"] == core_two["decisions"]


def test_bpb_equals_direct_computation_from_losses_and_token_bytes(trained, shared_data):
    model, _ = load_model(trained / "run" / "checkpoints", torch.device("cpu"))
    tokenizer = Tokenizer.load(trained / "tok")
    token_bytes = load_token_bytes(trained / "tok")
    _, val = read_shard_paths(shared_data / "pretrain")
    loader = lambda: BestFitLoader(tokenizer, [val], 4, 64, streams=[0], num_streams=1)  # noqa: E731
    with torch.no_grad():
        bpb = evaluate_bpb(model, loader(), 3, token_bytes)
        nats, nbytes, batches = 0.0, 0, loader()
        for _ in range(3):
            x, y = next(batches)
            logits = model(x).float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            for lp, target in zip(logp.flatten().tolist(), y.flatten().tolist()):
                b = tokenizer.decode_single_token_bytes(target) if target != tokenizer.get_bos_token_id() else b""
                if b:
                    nats -= lp
                    nbytes += len(b)
    assert bpb == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)


def test_bad_eval_mode_is_rejected(trained, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "model.evaluate", "--eval=core,foo",
                           f"--checkpoint-dir={trained / 'run' / 'checkpoints'}", f"--tokenizer-dir={trained / 'tok'}",
                           f"--out-dir={tmp_path}"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown mode" in proc.stderr and "foo" in proc.stderr
