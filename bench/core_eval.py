"""Benchmark: CORE evaluation by prefix sharing vs batching vs the one-item-at-a-time reference, same model and data.

    python -m bench.core_eval                                   # smoke-size model trained here for ~20 steps
    python -m bench.core_eval --checkpoint DIR --tokenizer-dir TOK [--step N] [--max-per-task 16]

Without --checkpoint, a tokenizer (vocab 1024) and a smoke-size GPT (depth 4, head_dim 64, T 128, as
deployments/presets/smoke.yaml) are trained on the spot on ../shared/data/pretrain, so the scores are not
uniform. With --checkpoint, DIR is a pretrain artifact's checkpoint/ folder (model_NNNNNN.pt + meta_NNNNNN.json).
Each task of the bundle (../shared/data/eval_bundle; missing tasks allowed) is evaluated the three ways
(model/core_scoring.py: method prefix, batched, reference), one right after the other, and the per-item
decisions compared with the reference's.

Prints one JSON object: prefix_examples_per_s, batched_examples_per_s, reference_examples_per_s,
prefix_vs_batched, prefix_vs_reference, decisions_equal, examples, plus what each fast path did (forwards,
padded vs real tokens, near-ties re-decided by the reference) and per-task timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from model.common import COMPUTE_DTYPE, autodetect_device_type, retain_freed_cpu_memory
from model.core_eval import evaluate_task
from model.core_prompts import context_limit, prepare_task_data
from model.core_scoring import BatchedStats, default_tie_tolerance, default_token_budget

METHODS = ("prefix", "batched", "reference")
from model.eval_bundle import load_bundle, load_task_data

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMOKE = dict(depth=4, aspect_ratio=64, head_dim=64, seq_len=128, window_pattern="L", vocab_size=1024,
             batch=8, steps=20, tokenizer_chars=2_000_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.core_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="a pretrain artifact's checkpoint/ directory")
    p.add_argument("--tokenizer-dir", type=Path, default=None, help="needed with --checkpoint")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--bundle-dir", type=Path, default=SHARED_DATA / "eval_bundle")
    p.add_argument("--data-dir", type=Path, default=SHARED_DATA / "pretrain", help="shards for the on-the-spot model")
    p.add_argument("--max-per-task", type=int, default=16)
    p.add_argument("--tasks", default="", help="comma list of task labels (default: every task in the bundle)")
    p.add_argument("--token-budget", type=int, default=None,
                   help="padded tokens per batched forward (default: by device)")
    p.add_argument("--train-steps", type=int, default=SMOKE["steps"])
    p.add_argument("--seq-len", type=int, default=SMOKE["seq_len"],
                   help="the on-the-spot model's sequence length (its context is 10x this)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps; empty = autodetect")
    args = p.parse_args(argv)
    if args.checkpoint is not None and args.tokenizer_dir is None:
        p.error("--checkpoint needs --tokenizer-dir (the tokenizer the checkpoint was trained with)")
    return args


def train_smoke_model(data_dir: Path, device: torch.device, steps: int, seq_len: int = SMOKE["seq_len"]):
    """(model, tokenizer): a vocab-1024 tokenizer and a smoke-size GPT trained `steps` steps on the shards.
    Its context (rotary range) is 10 x seq_len: at 128, 10-shot prompts past 1280 tokens are cut per option."""
    from model.data import iter_documents
    from model.dataloader import BestFitLoader
    from model.gpt import GPTConfig, build_model
    from model.sizing import ModelShape
    from model.tokenizer import train_tokenizer, training_texts

    shards = sorted(data_dir.glob("shard_*.parquet"))
    if len(shards) < 2:
        raise SystemExit(f"need at least 2 shard_*.parquet in {data_dir} to train the benchmark model "
                         "(or pass --checkpoint and --tokenizer-dir)")
    tokenizer = train_tokenizer(training_texts(iter_documents(shards[:1]), max_chars=SMOKE["tokenizer_chars"],
                                               doc_cap=10_000), vocab_size=SMOKE["vocab_size"])
    shape = ModelShape.from_depth(SMOKE["depth"], aspect_ratio=SMOKE["aspect_ratio"], head_dim=SMOKE["head_dim"],
                                  vocab_size=tokenizer.get_vocab_size(), seq_len=seq_len,
                                  window_pattern=SMOKE["window_pattern"])
    config = GPTConfig(sequence_len=shape.seq_len, vocab_size=shape.vocab_size, n_layer=shape.depth,
                       n_head=shape.n_head, n_kv_head=shape.n_kv_head, n_embd=shape.model_dim,
                       window_pattern=shape.window_pattern)
    torch.manual_seed(0)
    model = build_model(config, device)
    optimizer = model.setup_optimizer()
    loader = BestFitLoader(tokenizer, shards[:-1], SMOKE["batch"], seq_len, streams=[0], num_streams=1,
                           device=device)
    for _ in range(steps):
        x, y = next(loader)
        model(x, y).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    return model, tokenizer


def load_checkpoint_model(args, device: torch.device):
    from model.checkpoint import load_model
    from model.tokenizer import Tokenizer

    model, _meta = load_model(args.checkpoint, device, step=args.step, phase="eval")
    return model, Tokenizer.load(args.tokenizer_dir)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device_type or autodetect_device_type())
    if device.type == "cpu":  # as model.evaluate's compute_init does: the bench times what the stage runs
        print(retain_freed_cpu_memory(), file=sys.stderr)
    t0 = time.perf_counter()
    if args.checkpoint is None:
        model, tokenizer = train_smoke_model(args.data_dir, device, args.train_steps, args.seq_len)
    else:
        model, tokenizer = load_checkpoint_model(args, device)
    setup_s = time.perf_counter() - t0
    bundle = load_bundle(args.bundle_dir, allow_missing=True)
    tasks = bundle.tasks
    if args.tasks:
        wanted = args.tasks.split(",")
        unknown = sorted(set(wanted) - {t.label for t in tasks})
        if unknown:
            raise SystemExit(f"--tasks: not in the bundle: {', '.join(unknown)}")
        tasks = [t for t in tasks if t.label in wanted]

    stats = {method: BatchedStats() for method in METHODS if method != "reference"}
    seconds = dict.fromkeys(METHODS, 0.0)
    per_task, examples, all_equal = {}, 0, True
    for task in tasks:
        data = prepare_task_data(load_task_data(task), args.max_per_task)
        times, outcomes = {}, {}
        for method in METHODS:
            sync(device)
            start = time.perf_counter()
            outcomes[method] = evaluate_task(model, tokenizer, task, data, device=device, method=method,
                                             token_budget=args.token_budget, stats=stats.get(method))
            sync(device)
            times[method] = time.perf_counter() - start
            seconds[method] += times[method]
        equal = outcomes["prefix"] == outcomes["reference"] and outcomes["batched"] == outcomes["reference"]
        all_equal &= equal
        examples += len(data)
        per_task[task.label] = {"examples": len(data), **{f"{m}_s": round(times[m], 3) for m in METHODS},
                                "accuracy": sum(outcomes["reference"]) / len(data), "decisions_equal": equal}
        print(f"{task.label:<35} {len(data):4d} items  " + "  ".join(f"{m} {times[m]:7.2f}s" for m in METHODS)
              + f"  {'equal' if equal else 'DIFFERENT'}", file=sys.stderr, flush=True)

    config = model.config
    result = {
        **{f"{m}_examples_per_s": examples / seconds[m] for m in METHODS},
        "prefix_vs_batched": seconds["batched"] / seconds["prefix"],
        "prefix_vs_reference": seconds["reference"] / seconds["prefix"],
        "batched_vs_reference": seconds["reference"] / seconds["batched"],
        "decisions_equal": all_equal,
        "examples": examples,
        "tasks": len(tasks),
        **{f"{m}_s": seconds[m] for m in METHODS},
        **{f"{m}_{key}": getattr(stats[m], key) for m in stats
           for key in ("forwards", "sequences", "rechecked", "real_tokens", "padded_tokens")},
        "prefix_shared_items": stats["prefix"].prefix_shared,  # the rest: one sequence, or truncation left no prefix
        "token_budget": args.token_budget or default_token_budget(device),
        "tie_tolerance": default_tie_tolerance(device),
        "max_per_task": args.max_per_task,
        "context_limit": context_limit(model),
        "model": {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
                  "sequence_len": config.sequence_len, "vocab_size": config.vocab_size,
                  "source": str(args.checkpoint) if args.checkpoint else f"trained here, {args.train_steps} steps"},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],  # other processes on the machine skew CPU timings
        "setup_s": setup_s,
        "per_task": per_task,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
