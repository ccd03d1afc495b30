"""Chat evaluation (model/chat_scoring.py and its entry point model/chat_eval.py, docs/evaluation.md#chat-evaluation) on a tiny trained model and the real task files.

The model (depth 2, width 128) is a fresh build with random weights (see `model_and_config`): its letter
logits differ between problems, and it answers nothing on purpose. What is checked:
categorical predictions equal an independent per-problem argmax, batched greedy generation equals one
problem at a time, pass@k is "any sample passes", the CLI's summary and per-problem records are consistent
(ChatCORE by hand), and torchrun with 2 ranks (gloo) gives exactly the results of 1 process.
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from model.chat_data import chat_eval_task
from model.chat_render import render_for_completion
from model.chat_eval import parse_args
from model.chat_scoring import evaluate_tasks, letter_token_ids, parse_task_names, run_chat_eval
from model.checkpoint import save_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
STEP = 16  # the step number the checkpoint is saved under
SEQ_LEN = 256


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def data_dir(shared_data) -> Path:
    path = shared_data / "chat_eval"
    if not (path / "humaneval" / "HumanEval.jsonl").exists():
        pytest.skip(f"chat eval data not found in {path}")
    return path


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    from model.data import iter_documents
    from model.tokenizer import train_tokenizer, training_texts

    shard = sorted((shared_data / "pretrain").glob("shard_*.parquet"))[0]
    return train_tokenizer(training_texts(iter_documents([shard]), max_chars=300_000, doc_cap=10_000),
                           vocab_size=512)


@pytest.fixture(scope="module")
def model_and_config(tokenizer):
    """A fresh build whose weight matrices are all redrawn at random, 4x the 1/sqrt(fan_in) scale. The
    standard init zeroes the output projections, so its letter logits would depend on the last token only
    (the same for every problem), and so would those of a model trained for a few dozen steps (measured:
    one letter for all 16 problems); at 1x scale the shared prompt suffix still dominates. At 4x every
    prediction depends on the whole prompt, at no training cost."""
    from model.gpt import GPTConfig, build_model

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=128, window_pattern="SL")
    model = build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 4.0 * p.shape[1] ** -0.5)
    model.eval()
    return model, config


@pytest.fixture(scope="module")
def model(model_and_config):
    return model_and_config[0]


@pytest.fixture(scope="module")
def artifact(model_and_config, tokenizer, tmp_path_factory) -> Path:
    """The layout of an sft artifact: checkpoint/ (save_checkpoint format) and tokenizer/."""
    model, config = model_and_config
    root = tmp_path_factory.mktemp("sft_artifact")
    tokenizer.save(root / "tokenizer")
    save_checkpoint(root / "checkpoint", STEP, rank=0, model_state=model.state_dict(),
                    meta={"step": STEP, "model_config": asdict(config)}, optimizer_state={}, loader_state={})
    return root


# ----------------------------------------------------------------------------------------- helpers


def test_letter_token_ids(tokenizer):
    ids = letter_token_ids(tokenizer, ["A", "B", "C", "D"])
    assert ids == [tokenizer.encode(x)[0] for x in "ABCD"] and len(set(ids)) == 4
    with pytest.raises(ValueError, match="exactly one per letter"):
        letter_token_ids(tokenizer, ["A", "not a letter"])


def test_task_names_and_cli_validation():
    assert parse_task_names("all") == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
    assert parse_task_names("GSM8K|ARC-Easy") == ["GSM8K", "ARC-Easy"]
    assert parse_task_names(["MMLU", "MMLU"]) == ["MMLU"]
    with pytest.raises(ValueError, match="unknown chat eval task"):
        parse_task_names("ARC-Easy|SQuAD")
    base = ["--checkpoint-dir=c", "--tokenizer-dir=t", "--out-dir=o"]
    assert parse_args(base + ["--tasks=HumanEval|MMLU"]).task_names == ["HumanEval", "MMLU"]
    for bad in (["--tasks=Hellaswag"], ["--max-problems=0"], ["--temperature=-1"], ["--num-samples=0"]):
        with pytest.raises(SystemExit):
            parse_args(base + bad)


# -------------------------------------------------------------------------------------- categorical


def test_categorical_equals_per_problem_argmax(model, tokenizer, data_dir):
    n = 8
    results, records = evaluate_tasks(model, tokenizer, "ARC-Easy|MMLU", data_dir, max_problems=n, batch_size=3,
                                      log=quiet)
    predictions = []
    for name in ("ARC-Easy", "MMLU"):
        task = chat_eval_task(name, data_dir)
        assert [r["index"] for r in records[name]] == list(range(n))
        for i, record in enumerate(records[name]):
            conversation = task[i]
            prompt = render_for_completion(tokenizer, conversation)
            with torch.no_grad():
                logits = model(torch.tensor([prompt]))[0, -1]  # alone, no padding
            letters = conversation["letters"]
            letter_ids = [tokenizer.encode(x)[0] for x in letters]
            expected = letters[int(torch.argmax(logits[letter_ids]))]
            gold = conversation["messages"][-1]["content"]
            assert record == {"index": i, "prediction": expected, "gold": gold, "correct": expected == gold}
            predictions.append(expected)
        passed = sum(r["correct"] for r in records[name])
        assert results[name] == {"accuracy": passed / n, "passed": passed, "total": n}
    assert len(set(predictions)) >= 2, predictions  # the letters' logits really differ between problems


# --------------------------------------------------------------------------------------- generative


def test_batched_greedy_generation_equals_one_problem_at_a_time(model, tokenizer, data_dir):
    kw = dict(max_problems=5, batch_size=3, max_new_tokens=20, log=quiet)  # batches of 3 and 2 prompts
    batched = evaluate_tasks(model, tokenizer, "GSM8K|HumanEval", data_dir, batched_generation=True, **kw)
    single = evaluate_tasks(model, tokenizer, "GSM8K|HumanEval", data_dir, batched_generation=False, **kw)
    assert batched == single
    results, records = batched
    for name in ("GSM8K", "HumanEval"):
        task = chat_eval_task(name, data_dir)
        for i, record in enumerate(records[name]):
            assert record["index"] == i and len(record["completions"]) == 1
            assert record["completions"][0]  # something was generated
            assert record["correct"] == task.evaluate(task[i], record["completions"][0])
        passed = sum(r["correct"] for r in records[name])
        assert results[name] == {"accuracy": passed / 5, "passed": passed, "total": 5}


def test_sampling_passes_iff_any_sample_passes(model, tokenizer, data_dir):
    from model.engine import Engine

    results, records = evaluate_tasks(model, tokenizer, "GSM8K", data_dir, max_problems=3, num_samples=3,
                                      temperature=1.0, top_k=20, max_new_tokens=12, seed=7, log=quiet)
    task, engine = chat_eval_task("GSM8K", data_dir), Engine(model, tokenizer)
    for i, record in enumerate(records["GSM8K"]):
        prompt = render_for_completion(tokenizer, task[i])
        sequences, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=1.0, top_k=20, seed=7)
        assert record["completions"] == [tokenizer.decode(s[len(prompt):]) for s in sequences]
        assert len(set(record["completions"])) > 1  # really sampled
        assert record["correct"] == any(task.evaluate(task[i], c) for c in record["completions"])
    assert run_chat_eval(model, tokenizer, ["GSM8K"], data_dir, max_problems=3, num_samples=3, temperature=1.0,
                         top_k=20, max_new_tokens=12, seed=7, log=quiet) == results


# ---------------------------------------------------------------------------------------------- CLI


def run_cli(artifact: Path, data_dir: Path, out_dir: Path, nproc: int) -> dict:
    args = [f"--checkpoint-dir={artifact / 'checkpoint'}", f"--tokenizer-dir={artifact / 'tokenizer'}",
            f"--data-dir={data_dir}", "--tasks=all", "--max-problems=8", "--max-new-tokens=16", "--batch-size=3",
            "--device-type=cpu", f"--out-dir={out_dir}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "model.chat_eval", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "model.chat_eval", "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "ChatCORE:" in proc.stdout and "HumanEval: accuracy" in proc.stdout
    return json.loads((out_dir / "summary.json").read_text())


@pytest.mark.slow
def test_cli_summary_records_and_two_ranks_equal_one(artifact, data_dir, tmp_path):
    one = run_cli(artifact, data_dir, tmp_path / "one", nproc=1)
    two = run_cli(artifact, data_dir, tmp_path / "two", nproc=2)
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["step"] == two["step"] == STEP
    assert one["tasks"] == two["tasks"]
    assert (one["chatcore"], one["chatcore_cat"]) == (two["chatcore"], two["chatcore_cat"])
    baselines = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
    assert sorted(one["tasks"]) == sorted(baselines)
    for name, result in one["tasks"].items():
        assert result["total"] == 8 and 0 <= result["passed"] <= 8
        assert 0.0 <= result["accuracy"] <= 1.0 and result["accuracy"] == result["passed"] / 8
        lines_one = (tmp_path / "one" / f"{name}.jsonl").read_text().splitlines()
        assert lines_one == (tmp_path / "two" / f"{name}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines_one]
        assert [r["index"] for r in records] == list(range(8))
        assert sum(r["correct"] for r in records) == result["passed"]
    centred = {n: (one["tasks"][n]["accuracy"] - b) / (1 - b) for n, b in baselines.items()}
    assert one["chatcore"] == pytest.approx(sum(centred.values()) / 5, abs=1e-12)
    assert one["chatcore_cat"] == pytest.approx((centred["ARC-Easy"] + centred["ARC-Challenge"] + centred["MMLU"]) / 3,
                                                abs=1e-12)
    assert one["options"]["max_problems"] == 8 and one["options"]["batched_generation"] is True
