"""model.sft and its loader on CPU with real data: packing and masks, inheritance, learning, exact resume.

A tiny base model (depth 2, width 128, T=128, vocab 512) is pretrained for 20 steps by model.train; SFT then
runs on the real conversation files in ../shared/data/sft with max_seq_len 512 (at T=128 almost no GSM8K
conversation fits a row, and conversations are never cropped).
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

from model.chat_render import render_conversation
from model.data import iter_documents
from model.sft_loader import (LoaderStalled, SFTLoader, best_fit_index, pack_conversation_rows, rows_to_batch)
from model.tokenizer import Tokenizer, train_tokenizer, training_texts

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_LRS = {"matrix_lr": 0.1, "embedding_lr": 2.0, "unembedding_lr": 0.05}
BASE = ["--depth=2", "--aspect-ratio=64", "--head-dim=64", "--max-seq-len=128", "--window-pattern=SL",
        "--device-batch-size=4", "--total-batch-size=1024", "--warmup-steps=2", "--core-metric-every=-1",
        "--sample-every=-1", "--device-type=cpu", "--compile=off", "--run=dummy", "--eval-tokens=2048",
        "--num-iterations=20", "--eval-every=-1", *(f"--{k.replace('_', '-')}={v}" for k, v in BASE_LRS.items())]
# SFT: T and B overridden (reported), total batch and LRs inherited; 1024 / (1 x 512) = 2 micro-steps per step
SFT = ["--max-seq-len=512", "--device-batch-size=1", "--num-iterations=30", "--eval-every=10", "--eval-tokens=8192",
       "--save-every=10", "--keep-checkpoints=5", "--chatcore-every=-1", "--device-type=cpu", "--compile=off",
       "--run=dummy"]


def run(module: str, *args: str, wait: bool = True, timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def sft_files(shared_data) -> list[str]:
    files = sorted(str(p) for p in (shared_data / "sft").glob("*.jsonl"))
    if not files:
        pytest.skip(f"no conversation files in {shared_data / 'sft'}")
    return files


@pytest.fixture(scope="module")
def tokenizer_dir(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    docs = iter_documents(sorted((shared_data / "pretrain").glob("shard_*.parquet"))[:1])
    train_tokenizer(training_texts(docs, max_chars=1_000_000, doc_cap=10_000), vocab_size=512).save(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def conversations(sft_files) -> list[dict]:
    """The first 40 conversations of each file (real data, small enough to render quickly)."""
    out = []
    for path in sft_files:
        with open(path) as f:
            out += [json.loads(line) for _, line in zip(range(40), f)]
    return out


@pytest.fixture(scope="module")
def base_checkpoint(shared_data, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    run("model.train", *BASE, f"--out-dir={out}", f"--data-dir={shared_data / 'pretrain'}",
        f"--tokenizer-dir={tokenizer_dir}")
    return out / "checkpoints"


def sft_args(out_dir: Path, base: Path, tokenizer_dir: Path, files: list[str], *extra: str) -> list[str]:
    return [*SFT, f"--checkpoint-dir={base}", f"--tokenizer-dir={tokenizer_dir}", f"--out-dir={out_dir}",
            "--data", *files, *extra]


@pytest.fixture(scope="module")
def straight_run(base_checkpoint, tokenizer_dir, sft_files, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sft") / "straight"
    log = run("model.sft", *sft_args(out, base_checkpoint, tokenizer_dir, sft_files))
    return out, log


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# the loader


def test_best_fit_takes_the_longest_that_fits_earliest_on_ties_and_pads_with_bos():
    assert best_fit_index([3, 5, 5, 2, 7], 6) == 1
    assert best_fit_index([3, 5, 6, 6], 6) == 2
    assert best_fit_index([7, 8], 6) == -1
    bos = 0

    def conv(n, first):  # n tokens: BOS then ids first, first+1, ...; the last half supervised
        ids = [bos] + list(range(first, first + n - 1))
        return ids, [0] * (n - n // 2) + [1] * (n // 2)

    buffer = [conv(4, 10), conv(6, 20), conv(3, 30), conv(3, 40), conv(5, 50)]
    placed = []
    rows, masks, lengths = pack_conversation_rows(buffer, B=2, T=9, bos_token_id=bos,
                                                  on_place=lambda: placed.append(1))
    # row 0: 6 (the longest), then 4 fills it; row 1: 5, then the first 3, then nothing fits 2 -> padding
    assert rows[0] == conv(6, 20)[0] + conv(4, 10)[0]
    assert rows[1] == conv(5, 50)[0] + conv(3, 30)[0] + [bos, bos]
    assert masks[1] == conv(5, 50)[1] + conv(3, 30)[1] + [0, 0]
    assert lengths == [10, 8] and len(placed) == 4 and buffer == [conv(3, 40)]

    inputs, targets = rows_to_batch(rows, masks, lengths)
    assert inputs.dtype == torch.int32 and targets.dtype == torch.int64 and inputs.shape == (2, 9)
    assert inputs.tolist() == [r[:-1] for r in rows]
    m = torch.tensor(masks)
    expected = torch.tensor(rows)[:, 1:].masked_fill(m[:, 1:] == 0, -1)
    expected[1, 7:] = -1  # padded row, content length 8: targets from position 7 on are ignored
    assert torch.equal(targets, expected)
    assert targets[1, 6] == 31 and targets[1].tolist()[-2:] == [-1, -1]  # the last content token is a target


def test_rows_are_whole_conversations_from_bos_with_exact_targets(tokenizer, conversations):
    bos = tokenizer.get_bos_token_id()
    rendered = [render_conversation(tokenizer, c, max_tokens=2048) for c in conversations]
    masks_of = {tuple(ids): mask for ids, mask in rendered}
    B, T = 8, 256
    buffer = list(rendered)
    rows, masks, lengths = pack_conversation_rows(buffer, B, T, bos)
    used = []
    for row, mask, length in zip(rows, masks, lengths):
        assert len(row) == len(mask) == T + 1 and row[0] == bos
        # BOS occurs only where a conversation starts, so splitting at BOS recovers the pieces: each one is a
        # whole rendered conversation (never cropped) with its own mask, then BOS padding under mask 0
        starts = [i for i, t in enumerate(row[:length]) if t == bos] + [length]
        for a, z in zip(starts, starts[1:]):
            piece = tuple(row[a:z])
            assert piece in masks_of, "a row holds a cropped or unknown conversation"
            assert mask[a:z] == masks_of[piece]
            used.append(piece)
        assert row[length:] == [bos] * (T + 1 - length) and mask[length:] == [0] * (T + 1 - length)
        # best fit: once a row is padded, nothing left in the buffer would have fitted its free space
        assert length == T + 1 or all(len(ids) > T + 1 - length for ids, _ in buffer)
    assert len(used) + len(buffer) == len(rendered) and any(n < T + 1 for n in lengths)

    inputs, targets = rows_to_batch(rows, masks, lengths)
    for b in range(B):
        for t in range(T):
            supervised = masks[b][t + 1] == 1 and t < lengths[b] - 1
            assert targets[b, t].item() == (rows[b][t + 1] if supervised else -1)
    assert inputs.tolist() == [r[:-1] for r in rows]

    # the loader serves the same kind of rows, BOS first, targets either -1 or the next input
    x, y = next(SFTLoader(conversations, tokenizer, B, T, on_stall="pad"))
    assert bool((x[:, 0] == bos).all()) and x.shape == y.shape == (B, T)
    shifted = y[:, :-1]
    assert bool(((shifted == -1) | (shifted == x[:, 1:].long())).all()) and int((y >= 0).sum()) > 100


def test_loader_state_round_trips_exactly(tokenizer, conversations, tmp_path):
    # 12 conversations that fit a row, buffer 5: the cursor wraps (epochs) within a few batches
    small = [c for c in conversations if len(render_conversation(tokenizer, c)[0]) <= 200][:12]
    a = SFTLoader(small, tokenizer, 2, 256, rank=1, world_size=2, buffer_size=5, on_stall="pad")
    for _ in range(3):
        next(a)
    torch.save(a.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    b = SFTLoader(small, tokenizer, 2, 256, rank=1, world_size=2, buffer_size=5, on_stall="pad", state=state)
    assert (b.cursor, b.consumed, b.epoch, b.batches) == (a.cursor, a.consumed, a.epoch, a.batches)
    assert b.buffer == a.buffer
    for _ in range(8):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch > 1 and a.cursor % 2 in (0, 1) and a.consumed == b.consumed
    assert a.consumed % 2 == 1  # starts at the rank, grows by the world size per placed conversation
    with pytest.raises(ValueError, match="B is 2 in the state but 3 here"):
        SFTLoader(small, tokenizer, 3, 256, rank=1, world_size=2, buffer_size=5, state=state)


def test_loader_that_can_never_place_a_conversation_says_how_to_fix_it(tokenizer, conversations):
    long_ones = [c for c in conversations if len(render_conversation(tokenizer, c)[0]) > 65][:5]
    with pytest.raises(LoaderStalled, match="--max-seq-len"):
        next(SFTLoader(long_ones, tokenizer, 2, 64, buffer_size=5, on_stall="error"))
    with pytest.warns(RuntimeWarning, match="padding only"):
        x, y = next(SFTLoader(long_ones, tokenizer, 2, 64, buffer_size=5, on_stall="pad"))
    assert bool((x == tokenizer.get_bos_token_id()).all()) and bool((y == -1).all())


# ---------------------------------------------------------------------------------------------
# the entry point's pure parts


def test_inheritance_rules_and_grad_accumulation_errors():
    from model.sft import grad_accum_steps, lr_multiplier, muon_momentum, resolve_hyperparameters

    meta = {"max_seq_len": 256, "device_batch_size": 8, "total_batch_size": 4096,
            "user_config": {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "total_batch_size": -1}}
    cli = {"max_seq_len": None, "device_batch_size": 8, "total_batch_size": None,
           "embedding_lr": None, "unembedding_lr": None, "matrix_lr": 0.01}
    hp, sources, overrides = resolve_hyperparameters(cli, meta)
    assert hp == {"max_seq_len": 256, "device_batch_size": 8, "total_batch_size": 4096, "embedding_lr": 0.3,
                  "unembedding_lr": 0.008, "matrix_lr": 0.01}
    assert overrides == {"matrix_lr": {"value": 0.01, "checkpoint": 0.02}}  # an equal explicit value is no override
    assert sources["device_batch_size"] == "cli" and sources["total_batch_size"] == "checkpoint"
    hp, sources, _ = resolve_hyperparameters({k: None for k in cli}, {})
    assert hp == {"max_seq_len": 2048, "device_batch_size": 32, "total_batch_size": 524288, "embedding_lr": 0.3,
                  "unembedding_lr": 0.004, "matrix_lr": 0.02}
    assert set(sources.values()) == {"fallback"}

    assert grad_accum_steps(1048576, 16, 2048, 8) == 4  # the d24 speedrun SFT
    with pytest.raises(SystemExit, match="fix: pass --total-batch-size as a multiple of 2,048"):
        grad_accum_steps(3000, 4, 512, 1)
    assert [lr_multiplier(p, 0.0, 0.5, 0.0) for p in (0.0, 0.5, 0.75, 1.0)] == [1.0, 1.0, 0.5, 0.0]
    assert lr_multiplier(0.05, 0.1, 0.5, 0.0) == pytest.approx(0.5)
    assert lr_multiplier(0.9, 0.0, 0.4, 0.2) == pytest.approx(0.25 * 1 + 0.75 * 0.2)
    assert (muon_momentum(0), muon_momentum(150), muon_momentum(300), muon_momentum(1000)) == \
        (0.85, pytest.approx(0.90), 0.95, 0.95)


def test_optimizer_warm_start_keeps_fresh_lrs_and_falls_back_without_state(base_checkpoint, tmp_path, capsys):
    from model import checkpoint as ckpt
    from model.sft import warm_start_optimizer

    model, meta = ckpt.load_model(base_checkpoint, "cpu", phase="train")
    fresh = model.setup_optimizer(unembedding_lr=0.05, embedding_lr=2.0, matrix_lr=0.1, weight_decay=0.0)
    lrs = [g["lr"] for g in fresh.param_groups]
    assert warm_start_optimizer(fresh, base_checkpoint, meta["step"], 1, 0, 1, "cpu", print)
    assert [g["lr"] for g in fresh.param_groups] == lrs == [g["initial_lr"] for g in fresh.param_groups]
    assert len(fresh.state) > 0  # moments of the base run
    saved = torch.load(base_checkpoint / f"optim_{meta['step']:06d}_rank0.pt", weights_only=True)
    muon = [i for i, g in enumerate(fresh.param_groups) if g["kind"] == "muon"]
    assert all(fresh.param_groups[i]["weight_decay"] == saved["param_groups"][i]["weight_decay"] for i in muon)

    other = model.setup_optimizer(unembedding_lr=0.05, embedding_lr=2.0, matrix_lr=0.1, weight_decay=0.0)
    assert not warm_start_optimizer(other, tmp_path, meta["step"], 1, 0, 1, "cpu", print)
    assert "starting from a fresh optimizer" in capsys.readouterr().out and len(other.state) == 0


# ---------------------------------------------------------------------------------------------
# whole runs


def test_sft_inherits_from_the_base_checkpoint_and_reports_overrides(straight_run):
    out, log = straight_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hyperparameters"] == {"max_seq_len": 512, "device_batch_size": 1, "total_batch_size": 1024,
                                          **BASE_LRS}
    assert summary["inherited"] == ["embedding_lr", "matrix_lr", "total_batch_size", "unembedding_lr"]
    assert summary["overrides"] == {"max_seq_len": {"value": 512, "checkpoint": 128},
                                    "device_batch_size": {"value": 1, "checkpoint": 4}}
    assert "override: max_seq_len = 512 (base checkpoint: 128)" in log
    assert "Total batch size 1,024 => gradient accumulation steps: 2" in log
    assert summary["optimizer_warm_start"] is True
    # the inherited raw LRs x init_lr_frac 0.8 (AdamW LRs also x the width scaling (128/768)^-0.5)
    optim = torch.load(out / "checkpoints" / "optim_000030_rank0.pt", weights_only=True)
    groups = optim["param_groups"]
    scale = (128 / 768) ** -0.5
    assert groups[0]["initial_lr"] == pytest.approx(0.05 * scale * 0.8)  # lm_head
    assert groups[1]["initial_lr"] == pytest.approx(2.0 * scale * 0.8)  # wte
    assert all(g["initial_lr"] == pytest.approx(0.1 * 0.8) for g in groups if g["kind"] == "muon")
    meta = json.loads((out / "checkpoints" / "meta_000030.json").read_text())
    assert meta["model_config"]["sequence_len"] == 512 and meta["max_seq_len"] == 512


def test_sft_lowers_the_masked_val_bpb(straight_run):
    out, _ = straight_run
    bpb = {m["step"]: m["val/bpb"] for m in read_metrics(out) if "val/bpb" in m}
    assert sorted(bpb) == [0, 10, 20, 30]
    assert bpb[30] < bpb[0] - 0.4, bpb
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 30 and summary["val_bpb"] == bpb[30] and summary["min_val_bpb"] == min(bpb.values())
    assert summary["num_conversations"] == 12854 - 12854 // 50 and summary["num_val_conversations"] == 12854 // 50
    assert summary["world_size"] == 1 and summary["device"] == "cpu" and summary["timed_steps"] == 30 - 11
    assert 0 < summary["train_loss"] < 10 and summary["total_training_time"] > 0
    assert (out / "checkpoints" / "complete_000030").exists()
    train_steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert train_steps == list(range(1, 31))  # step is counted before logging


def test_killed_sft_run_resumes_bitwise(straight_run, base_checkpoint, tokenizer_dir, sft_files, tmp_path):
    straight, _ = straight_run
    killed = tmp_path / "killed"
    args = sft_args(killed, base_checkpoint, tokenizer_dir, sft_files)
    proc = run("model.sft", *args, wait=False)
    marker = killed / "checkpoints" / "complete_000010"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, "SFT ended before it could be killed: " + proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 10 in time"
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    if proc.returncode == 0:  # it finished before the kill landed: leave what a kill right after step 10 leaves
        for step in (20, 30):
            (killed / "checkpoints" / f"complete_{step:06d}").unlink()
        (killed / "summary.json").unlink()
    assert not (killed / "summary.json").exists()

    out = run("model.sft", *args, "--resume=auto")
    assert "resuming from step 10" in out
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert b["train_loss"] == a["train_loss"]  # bitwise, not approximately
    assert b["val_bpb"] == a["val_bpb"] and b["min_val_bpb"] == a["min_val_bpb"]
    assert b["conversations_consumed"] == a["conversations_consumed"]
    final_a = torch.load(straight / "checkpoints" / "model_000030.pt", weights_only=True)
    final_b = torch.load(killed / "checkpoints" / "model_000030.pt", weights_only=True)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    losses_a = [m["train/raw_loss"] for m in read_metrics(straight) if "train/loss" in m]
    records_b = [m for m in read_metrics(killed) if "train/loss" in m]
    assert [m["step"] for m in records_b] == list(range(1, 31))  # the log carries on, nothing twice
    assert [m["train/raw_loss"] for m in records_b] == losses_a


@pytest.mark.slow
def test_two_rank_one_pass_run_stops_together_and_scores_chatcore(base_checkpoint, tokenizer_dir, sft_files,
                                                                   shared_data, tmp_path):
    from model.chat_data import CHAT_EVAL_TASKS, chatcore

    data = tmp_path / "alpaca_150.jsonl"  # the first 150 real conversations: one pass is ~36 steps per rank
    with open(next(f for f in sft_files if "alpaca" in f)) as f:
        data.write_text("".join(line for _, line in zip(range(150), f)))
    out = tmp_path / "two"
    args = [*(a for a in SFT if not a.startswith(("--num-iterations", "--chatcore-every"))),
            f"--checkpoint-dir={base_checkpoint}", f"--tokenizer-dir={tokenizer_dir}", f"--out-dir={out}",
            "--data", str(data), "--eval-tokens=2048", "--chatcore-every=1000", "--chatcore-max-cat=4",
            "--chatcore-max-sample=1", "--chatcore-max-new-tokens=16", f"--chat-eval-dir={shared_data / 'chat_eval'}"]
    log = run("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "model.sft", "--", *args)
    # the base optimizer state is per rank and was written by one rank: warning, fresh optimizer
    assert "written by 1 ranks, this run has 2" in log and "starting from a fresh optimizer" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["optimizer_warm_start"] is False
    # one pass: stops once the mixture is consumed; the schedule ends at 0 and never goes negative
    assert summary["num_iterations"] == -1 and summary["num_conversations"] == 147
    assert summary["conversations_consumed"] >= 147 and summary["progress"] == 1.0
    last = summary["step"]
    assert 20 < last < 80
    train = [m for m in read_metrics(out) if "train/loss" in m]
    assert [m["step"] for m in train] == list(range(1, last + 1))
    assert train[-1]["train/lrm"] == 0.0 and min(m["train/lrm"] for m in train) >= 0.0
    ckpts = out / "checkpoints"
    assert {p.name for p in ckpts.glob(f"*_{last:06d}*")} == {
        f"model_{last:06d}.pt", f"meta_{last:06d}.json", f"optim_{last:06d}_rank0.pt", f"optim_{last:06d}_rank1.pt",
        f"loader_{last:06d}_rank0.pt", f"loader_{last:06d}_rank1.pt", f"complete_{last:06d}"}
    # ChatCORE at the last step over all five tasks, aggregated with the baselines
    assert sorted(summary["chat_accuracy"]) == sorted(CHAT_EVAL_TASKS)
    assert all(0.0 <= a <= 1.0 for a in summary["chat_accuracy"].values())
    expected = chatcore(summary["chat_accuracy"])
    assert summary["chatcore"] == expected["chatcore"] and summary["chatcore_cat"] == expected["chatcore_cat"]
    record = [m for m in read_metrics(out) if "chatcore_metric" in m]
    assert len(record) == 1 and record[0]["step"] == last and record[0]["chatcore_metric"] == summary["chatcore"]
