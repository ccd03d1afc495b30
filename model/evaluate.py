"""Base-model evaluation: the torchrun entry point (the reference's scripts/base_eval.py; docs/evaluation.md#base-evaluation).

    torchrun --standalone --nproc_per_node=8 -m model.evaluate -- --checkpoint-dir=<pretrain artifact>/checkpoint \
        --tokenizer-dir=<tokenizer artifact> --data-dir=<shards artifact> --bundle-dir=<eval bundle> --out-dir=out

In order: samples (rank 0), bits per byte on the train and val splits, CORE. Examples and batches are split
across ranks and the totals all-reduced, so any number of ranks gives the results of one. Writes to
--out-dir: base_model_<step>.csv (the reference's CORE table), core.json (per-task accuracy, centered,
per-example decisions) and summary.json (core_metric, per-task results, train_bpb, val_bpb, samples).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from model.checkpoint import load_model
from model.common import ATTENTION_CHOICES, autodetect_device_type, compute_cleanup, compute_init, setup_attention
from model.core_eval import METHODS, evaluate_core, write_core_csv
from model.data import read_shard_paths
from model.dataloader import BestFitLoader
from model.engine import SAMPLE_PROMPTS, Engine
from model.eval_bundle import load_bundle
from model.files import atomic_write_text
from model.loss_eval import evaluate_bpb
from model.tokenizer import Tokenizer, load_token_bytes

EVAL_MODES = ("core", "bpb", "sample")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description="Evaluate a base checkpoint.")
    a = p.add_argument
    a("--eval", default="core,bpb,sample", help="comma list of core, bpb, sample")
    a("--step", type=int, default=None, help="checkpoint step (default: the last)")
    a("--max-per-task", type=int, default=-1, help="CORE examples per task (-1 = all)")
    a("--device-batch-size", type=int, default=32, help="rows per bpb batch")
    a("--split-tokens", type=int, default=40 * 524288, help="tokens per split for bpb")
    a("--device-type", default="", help="cuda|cpu|mps; empty = autodetect")
    a("--checkpoint-dir", required=True, help="directory with model_NNNNNN.pt + meta_NNNNNN.json")
    a("--tokenizer-dir", required=True)
    a("--data-dir", help="shards artifact or shard directory (needed for bpb)")
    a("--bundle-dir", help="CORE eval bundle directory (needed for core)")
    a("--allow-missing-tasks", action="store_true", help="average CORE over the tasks present")
    a("--core-token-budget", type=int, default=0, help="tokens per batched CORE forward (0 = default)")
    a("--core-method", default="prefix", choices=METHODS,
      help="CORE evaluator, same decisions: prefix (shared prefix once, default), batched, reference (one item at a time)")
    a("--max-context", type=int, default=-1,
      help="CORE prompts keep at most their last N tokens (-1 = only the model's own limit, as the reference)")
    a("--attention", default="auto", choices=ATTENTION_CHOICES,
      help="attention backend: auto (best available), fused (FA3/FA4 or fail), fa3, fa4, flex, sdpa")
    a("--out-dir", required=True)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.eval.split(",") if m.strip()]
    bad = [m for m in modes if m not in EVAL_MODES]
    if bad or not modes:
        p.error(f"--eval: unknown mode(s) {bad}; use a comma list of {', '.join(EVAL_MODES)}")
    if "bpb" in modes and not args.data_dir:
        p.error("--eval bpb needs --data-dir")
    if "core" in modes and not args.bundle_dir:
        p.error("--eval core needs --bundle-dir")
    args.modes = modes
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    distributed, rank, _local_rank, world, device = compute_init(args.device_type or autodetect_device_type())
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    attention_info = setup_attention(args.attention, device.type, say)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model, meta = load_model(Path(args.checkpoint_dir), device, step=args.step, phase="eval")
    step = meta["step"]
    tokenizer = Tokenizer.load(args.tokenizer_dir)
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise SystemExit(f"tokenizer vocab {tokenizer.get_vocab_size()} != model vocab {model.config.vocab_size}: "
                         "evaluate with the tokenizer the checkpoint was trained with")
    summary: dict = {"step": step, "model_config": meta["model_config"], **attention_info}

    if "sample" in args.modes and master:
        engine, bos = Engine(model, tokenizer), tokenizer.get_bos_token_id()
        prompts = [tokenizer.encode(prompt, prepend=bos) for prompt in SAMPLE_PROMPTS]
        completions = engine.generate_prompts(prompts, max_tokens=16, temperature=0.0)  # greedy, batched
        samples = []
        for prompt, tokens in zip(SAMPLE_PROMPTS, completions):
            samples.append({"prompt": prompt, "completion": tokenizer.decode(tokens)})
            say(f"sample | {prompt}{samples[-1]['completion']}")
        # 8 unconditioned samples from BOS alone, one engine call
        sequences, _ = engine.generate_batch([bos], num_samples=8, max_tokens=128, temperature=1.0)
        samples += [{"prompt": "", "completion": tokenizer.decode(seq[1:])} for seq in sequences]
        summary["samples"] = samples

    if "bpb" in args.modes:
        token_bytes = load_token_bytes(args.tokenizer_dir, device=device)
        train_paths, val_path = read_shard_paths(args.data_dir)
        B, T = args.device_batch_size, model.config.sequence_len
        steps = max(1, args.split_tokens // (B * T * world))
        for split, paths in (("train", train_paths), ("val", [val_path])):
            t0 = time.time()
            batches = BestFitLoader(tokenizer, paths, B, T, streams=[rank], num_streams=world, device=device)
            summary[f"{split}_bpb"] = evaluate_bpb(model, batches, steps, token_bytes)
            say(f"{split} bpb: {summary[f'{split}_bpb']:.6f} ({steps * B * T * world:,} tokens, {time.time() - t0:.1f}s)")

    if "core" in args.modes:
        bundle = load_bundle(Path(args.bundle_dir), allow_missing=args.allow_missing_tasks)
        kwargs = {"token_budget": args.core_token_budget} if args.core_token_budget > 0 else {}
        core = evaluate_core(model, tokenizer, bundle, max_per_task=args.max_per_task, device=device,
                             rank=rank, world_size=world, log=say, method=args.core_method,
                             max_context=args.max_context if args.max_context > 0 else None, **kwargs)
        summary.update(core_metric=core["core_metric"], core_results=core["results"],
                       core_centered=core["centered_results"], core_tasks=core["core_tasks"],
                       missing_tasks=core["missing_tasks"])
        say(f"CORE metric: {core['core_metric']:.4f} ({core['core_tasks']} tasks)")
        if master:
            write_core_csv(out_dir / f"base_model_{step:06d}.csv", core)
            atomic_write_text(out_dir / "core.json", json.dumps(core, indent=2))

    if master:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    compute_cleanup()
    return summary


if __name__ == "__main__":
    with torch.no_grad():
        main()
