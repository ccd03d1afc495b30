"""model.train on CPU with real shards and real torchrun (gloo): learning, 2 ranks == 1 rank, exact resume.

A tiny model (depth 2, width 128, T=64) keeps each run to seconds; the cost is mostly process start-up.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.tokenizer import train_tokenizer, training_texts
from model.data import iter_documents

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY = ["--depth=2", "--aspect-ratio=64", "--head-dim=64", "--max-seq-len=64", "--window-pattern=SL",
        "--device-batch-size=4", "--total-batch-size=512", "--warmup-steps=2", "--core-metric-every=-1",
        "--sample-every=-1", "--device-type=cpu", "--compile=off", "--run=dummy", "--eval-tokens=1024",
        "--matrix-lr=0.1", "--embedding-lr=2.0", "--unembedding-lr=0.05"]


@pytest.fixture(scope="module")
def tokenizer_dir(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    docs = iter_documents(sorted((shared_data / "pretrain").glob("shard_*.parquet"))[:1])
    train_tokenizer(training_texts(docs, max_chars=1_000_000, doc_cap=10_000), vocab_size=512).save(out)
    return out


def train(out_dir: Path, tokenizer_dir: Path, data_dir: Path, *extra: str, nproc: int = 1,
          wait: bool = True, timeout: int = 300):
    """Run model.train as a user would: plain python for one process, torchrun for several."""
    args = [*TINY, f"--out-dir={out_dir}", f"--data-dir={data_dir}", f"--tokenizer-dir={tokenizer_dir}", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "model.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "model.train", "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def val_bpbs(out_dir: Path) -> dict[int, float]:
    return {m["step"]: m["val/bpb"] for m in read_metrics(out_dir) if "val/bpb" in m}


def test_training_lowers_val_bpb_and_writes_the_leaderboard_keys(tokenizer_dir, shared_data, tmp_path):
    out = train(tmp_path / "run", tokenizer_dir, shared_data / "pretrain", "--num-iterations=40", "--eval-every=20")
    assert "Total batch size 512 => gradient accumulation steps: 2" in out
    bpb = val_bpbs(tmp_path / "run")
    assert sorted(bpb) == [0, 20, 40]
    assert bpb[40] < bpb[0] - 0.1, bpb
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("total_training_time", "total_training_flops", "min_val_bpb", "step", "mfu", "tok_per_sec"):
        assert key in summary
    assert summary["step"] == 40 and summary["min_val_bpb"] == min(bpb.values())
    assert summary["total_training_flops"] == summary["flops_per_token"] * 512 * 40
    assert summary["timed_steps"] == 40 - 11 and summary["total_training_time"] > 0
    assert (tmp_path / "run" / "checkpoints" / "complete_000040").exists()


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_accumulation(tokenizer_dir, shared_data, tmp_path):
    common = ["--num-iterations=8", "--eval-every=4", "--data-streams=2"]
    train(tmp_path / "one", tokenizer_dir, shared_data / "pretrain", *common)
    train(tmp_path / "two", tokenizer_dir, shared_data / "pretrain", *common, nproc=2)
    one, two = val_bpbs(tmp_path / "one"), val_bpbs(tmp_path / "two")
    assert sorted(one) == sorted(two) == [0, 4, 8]
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])
    final_one = torch.load(tmp_path / "one" / "checkpoints" / "model_000008.pt", weights_only=True)
    final_two = torch.load(tmp_path / "two" / "checkpoints" / "model_000008.pt", weights_only=True)
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_two[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_is_bitwise_identical(tokenizer_dir, shared_data, tmp_path):
    common = ["--num-iterations=16", "--eval-every=8", "--save-every=4", "--keep-checkpoints=3"]
    train(tmp_path / "straight", tokenizer_dir, shared_data / "pretrain", *common)

    killed = tmp_path / "killed"
    proc = train(killed, tokenizer_dir, shared_data / "pretrain", *common, wait=False)
    marker = killed / "checkpoints" / "complete_000008"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint at step 8 in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()

    out = train(killed, tokenizer_dir, shared_data / "pretrain", *common, "--resume=auto")
    resumed_from = int(out.split("resuming from step ")[1].split()[0])
    assert resumed_from >= 8
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert b["final_train_loss"] == a["final_train_loss"]  # bitwise, not approximately
    assert b["min_val_bpb"] == a["min_val_bpb"] and b["val_bpb"] == a["val_bpb"]
    final_a = torch.load(tmp_path / "straight" / "checkpoints" / "model_000016.pt", weights_only=True)
    final_b = torch.load(killed / "checkpoints" / "model_000016.pt", weights_only=True)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    # the log of the resumed run carries on from the checkpoint rather than duplicating steps
    steps = [m["step"] for m in read_metrics(killed) if "train/loss" in m]
    assert steps == list(range(16))


def test_bad_data_dir_fails_naming_the_fix(tokenizer_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "model.train", *TINY, "--num-iterations=2", f"--out-dir={tmp_path / 'o'}",
                           f"--data-dir={empty}", f"--tokenizer-dir={tokenizer_dir}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "shards" in proc.stderr and str(empty) in proc.stderr


def test_prune_checkpoints_keeps_the_newest_complete_ones(tmp_path):
    from model import checkpoint as ckpt

    for step in (4, 8, 12):
        ckpt.save_checkpoint(tmp_path, step, rank=0, model_state={"w": torch.zeros(1)}, meta={"step": step},
                             optimizer_state={}, loader_state={})
    (tmp_path / "model_000016.pt").write_bytes(b"half-written checkpoint without its marker")
    ckpt.prune_checkpoints(tmp_path, set(ckpt.complete_steps(tmp_path)[-2:]))
    assert ckpt.complete_steps(tmp_path) == [8, 12]
    assert not list(tmp_path.glob("*_000004*"))
    assert (tmp_path / "model_000016.pt").exists()  # not complete, so not ours to judge
    assert ckpt.last_complete_step(tmp_path) == 12


FAULTS_OF_A_TENSOR_AFTER_A_FREED_ONE = """
import resource, torch
from model.common import compute_init
compute_init("cpu")
torch.empty(64 * 2**20).fill_(1.0)  # 256 MB, touched, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(63 * 2**20).fill_(1.0)  # 252 MB: fits in the freed block (an equal size may not: posix_memalign asks more)
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator setting is glibc's (Linux)")
def test_cpu_processes_reuse_freed_memory_instead_of_faulting_it_in_again():
    """compute_init('cpu') keeps freed heap blocks in the process: a 252 MB tensor allocated after a 256 MB one
    is freed reuses its pages (no page faults), where glibc's default maps fresh pages (64512 faults of 4 KiB,
    or 126 of 2 MiB with transparent huge pages). glibc's own malloc variables turn it off."""
    def run(**env):
        proc = subprocess.run([sys.executable, "-c", FAULTS_OF_A_TENSOR_AFTER_A_FREED_ONE], cwd=REPO_ROOT,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        return lines[0], int(lines[-1].split()[1])

    said, faults = run()
    assert "freed memory stays in the process" in said
    assert faults < 64, faults
    said, faults = run(MALLOC_MMAP_MAX_="65536")
    assert said == "CPU allocator left as set by MALLOC_MMAP_MAX_"
    assert faults >= 100, faults


def test_compile_auto_decides_from_the_planned_steps():
    from model.common import CPU_COMPILE_MIN_STEPS, decide_compile

    assert decide_compile("auto", "cuda", 5)[0] is True
    assert decide_compile("auto", "cpu", 20)[0] is False  # smoke: compiling would cost more than it saves
    assert decide_compile("auto", "cpu", 600)[0] is True  # the cpu preset's pretraining
    assert decide_compile("auto", "cpu", 200)[0] is False  # its SFT: compiling would about break even
    assert decide_compile("auto", "cpu", CPU_COMPILE_MIN_STEPS)[0] is True
    assert decide_compile("auto", "mps", 10_000)[0] is False
    assert decide_compile("on", "cpu", 1) == (True, "--compile=on")
    assert decide_compile("off", "cuda", 10_000) == (False, "--compile=off")
    assert "planned steps" in decide_compile("auto", "cpu", 20)[1]
    with pytest.raises(ValueError, match="auto, on or off"):
        decide_compile("yes", "cpu", 1)
