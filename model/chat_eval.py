"""Chat evaluation, the torchrun entry point: score an SFT checkpoint on the chat tasks and write the results
(docs/evaluation.md#chat-evaluation; the scoring itself is model/chat_scoring.py).

    torchrun --standalone --nproc_per_node=8 -m model.chat_eval -- --checkpoint-dir=<sft artifact>/checkpoint \
        --tokenizer-dir=<sft artifact>/tokenizer [--data-dir=../shared/data/chat_eval] --out-dir=out

Writes to --out-dir `summary.json` ({"tasks": {name: {accuracy, passed, total}}, "chatcore", "chatcore_cat",
...}) and `<task>.jsonl` (one record per problem, by index: "prediction" or "completions", and "correct").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from model.chat_data import CHAT_EVAL_TASKS, chatcore
from model.chat_scoring import evaluate_tasks, parse_task_names
from model.checkpoint import load_model
from model.common import (ATTENTION_CHOICES, autodetect_device_type, compute_cleanup, compute_init, print0,
                          setup_attention)
from model.files import atomic_write_text
from model.tokenizer import Tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.chat_eval", description="Evaluate a chat model.")
    a = p.add_argument
    a("--checkpoint-dir", required=True, help="directory with model_NNNNNN.pt + meta_NNNNNN.json")
    a("--step", type=int, default=None, help="checkpoint step (default: the last)")
    a("--tokenizer-dir", required=True)
    a("--data-dir", default=None, help="local chat_eval files (../shared/data/chat_eval layout); default: the hub")
    a("--tasks", default="all", help="'all' or task names joined by '|', from " + ", ".join(CHAT_EVAL_TASKS))
    a("--temperature", type=float, default=0.0)
    a("--max-new-tokens", type=int, default=512)
    a("--num-samples", type=int, default=1)
    a("--top-k", type=int, default=50, help="0 = no top-k")
    a("--batch-size", type=int, default=8, help="problems per forward (categorical) / per engine call (greedy)")
    a("--max-problems", type=int, default=None, help="first N problems of each task (default: all)")
    a("--seed", type=int, default=42, help="sampling seed (the same for every problem, as the reference)")
    a("--no-batched-generation", action="store_true", help="greedy generation one problem at a time")
    a("--device-type", default="", help="cuda|cpu|mps; empty = autodetect")
    a("--attention", default="auto", choices=ATTENTION_CHOICES,
      help="attention backend: auto (best available), fused (FA3/FA4 or fail), fa3, fa4, flex, sdpa")
    a("--out-dir", required=True)
    args = p.parse_args(argv)
    try:
        args.task_names = parse_task_names(args.tasks)
    except ValueError as e:
        p.error(f"--tasks: {e}")
    for flag in ("max_new_tokens", "num_samples", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_problems is not None and args.max_problems < 1:
        p.error("--max-problems must be >= 1 (omit it for all problems)")
    if args.temperature < 0:
        p.error("--temperature must be >= 0 (0 = greedy)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    distributed, rank, _local_rank, world, device = compute_init(args.device_type or autodetect_device_type())
    attention_info = setup_attention(args.attention, device.type, print0)
    out_dir = Path(args.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(Path(args.checkpoint_dir), device, step=args.step, phase="eval")
    tokenizer = Tokenizer.load(args.tokenizer_dir)
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise SystemExit(f"tokenizer vocab {tokenizer.get_vocab_size()} != model vocab {model.config.vocab_size}: "
                         "evaluate with the tokenizer the checkpoint was trained with")
    options = {k: getattr(args, k) for k in ("temperature", "max_new_tokens", "num_samples", "top_k", "batch_size",
                                             "max_problems", "seed", "data_dir")}
    options["batched_generation"] = not args.no_batched_generation
    results, records = evaluate_tasks(model, tokenizer, args.task_names, args.data_dir,
                                      max_problems=args.max_problems, batch_size=args.batch_size,
                                      num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                      batched_generation=not args.no_batched_generation)
    scores = chatcore({name: r["accuracy"] for name, r in results.items()})
    if scores["chatcore"] is not None:
        print0(f"ChatCORE: {scores['chatcore']:.4f}")
    if scores["chatcore_cat"] is not None:
        print0(f"ChatCORE (categorical): {scores['chatcore_cat']:.4f}")
    summary = {"tasks": results, **scores, "step": meta["step"], "world_size": world, "device": str(device),
               "options": options, "model_config": meta.get("model_config"), "elapsed_s": time.time() - t0,
               **attention_info}
    if rank == 0:
        for name, task_records in records.items():
            atomic_write_text(out_dir / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in task_records))
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    compute_cleanup()
    return summary


if __name__ == "__main__":
    main()
