"""Supervised fine-tuning of a base checkpoint on conversations: the torchrun entry point (docs/evaluation.md#sft).

    torchrun --standalone --nproc_per_node=8 -m model.sft -- --checkpoint-dir=<pretrain artifact>/checkpoint \
        --tokenizer-dir=<tokenizer artifact> --out-dir=runs/sft [--data a.jsonl b.jsonl] [--chat-eval-dir DIR]

Every option of the reference chat_sft with the same default, plus --checkpoint-dir/--tokenizer-dir/--out-dir,
--data (local conversation files instead of the hub mixture), --chat-eval-dir (ChatCORE task files instead of
the hub), --save-every, --resume auto, --compile, --wandb-mode. What this run does:

- loads the base model (its last step, or --model-step) and trains it with sequence length max_seq_len;
  max_seq_len, device_batch_size and total_batch_size default to the base run's resolved values (its meta),
  the three learning rates to the base run's raw CLI values (its user_config); an explicit value that
  differs from the checkpoint's is printed as an override;
- warm-starts the optimizer from the base run's per-rank optimizer state (--load-optimizer 1) but with the
  fresh learning rates, all scaled by --init-lr-frac;
- packs conversations with the padding best-fit loader (model/sft_loader.py), trains only on the tokens
  the assistant produces, for one pass over the mixture (or --num-iterations optimizer steps);
- evaluates val bpb at step 0, every --eval-every steps and at the end, ChatCORE every --chatcore-every
  steps and at the end (when > 0).

Writes to --out-dir: checkpoints/ (same format as model/train.py: model, meta, per-rank optimizer and loader
state, complete_ marker), metrics.jsonl, summary.json. With --resume auto a killed run continues from its last
complete checkpoint and, on CPU, ends bitwise where an uninterrupted run ends. SIGTERM saves and exits 75 as
model/train.py does (model/run_control.py).

Above main(): the pure helpers (inherited hyper-parameters, schedules, the masked loss) and the set-up pieces
only SFT has (optimizer warm start, ChatCORE). main() is a straight script like model/train.py's; the
machinery the two share (process set-up, resume, checkpoint save and pruning, step timing and GC, wandb and
metrics.jsonl, summary.json) is model/loop.py's TrainingRun.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # before torch initialises CUDA

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model import checkpoint as ckpt  # noqa: E402
from model.files import atomic_write_text  # noqa: E402
from model.gpt import GPTConfig, build_model  # noqa: E402
from model.loop import TrainingRun, add_run_options  # noqa: E402
from model.run_control import check_finite  # noqa: E402
from model.sft_loader import SFTLoader  # noqa: E402
from model.tokenizer import Tokenizer, load_token_bytes  # noqa: E402

# None on the command line = inherit from the base checkpoint; these are the fallbacks when it lacks the key.
FROM_META = {"max_seq_len": 2048, "device_batch_size": 32, "total_batch_size": 524288}  # resolved values, top level
FROM_USER_CONFIG = {"embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.02}  # the base run's raw CLI values
CATEGORICAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU")
GENERATIVE_TASKS = ("GSM8K", "HumanEval")
MUON_MOMENTUM_WARMUP = 300
WANDB_EVERY = 10


def _source_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH; fix: e.g. --source gsm8k=train.jsonl")
    return name, path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.sft", description="Supervised fine-tuning.")
    a = p.add_argument
    a("--run", default="dummy", help="wandb run name ('dummy' disables wandb; project speedrun-sft)")
    a("--device-type", default="", help="cuda|cpu|mps; empty = autodetect")
    a("--model-tag", default=None, help="accepted for compatibility; --checkpoint-dir names the base checkpoint")
    a("--model-step", type=int, default=None, help="base checkpoint step (default: its last)")
    a("--load-optimizer", type=int, default=1, choices=[0, 1], help="warm-start from the base run's optimizer state")
    a("--num-iterations", type=int, default=-1, help="optimizer steps; -1 = one pass over the mixture")
    a("--max-seq-len", type=int, default=None, help="default: the base checkpoint's")
    a("--device-batch-size", type=int, default=None, help="default: the base checkpoint's")
    a("--total-batch-size", type=int, default=None, help="tokens per step; default: the base checkpoint's")
    a("--embedding-lr", type=float, default=None, help="default: the base run's --embedding-lr")
    a("--unembedding-lr", type=float, default=None, help="default: the base run's --unembedding-lr")
    a("--matrix-lr", type=float, default=None, help="default: the base run's --matrix-lr")
    a("--init-lr-frac", type=float, default=0.8)
    a("--warmup-ratio", type=float, default=0.0)
    a("--warmdown-ratio", type=float, default=0.5)
    a("--final-lr-frac", type=float, default=0.0)
    a("--eval-every", type=int, default=200, help="val bpb period (also step 0 and the last step); -1 disables")
    a("--eval-tokens", type=int, default=40 * 524288)
    a("--chatcore-every", type=int, default=200, help="ChatCORE period (and the last step); -1 disables")
    a("--chatcore-max-cat", type=int, default=-1, help="problems per categorical task (-1 = all)")
    a("--chatcore-max-sample", type=int, default=24, help="problems per generative task (-1 = all)")
    a("--chatcore-max-new-tokens", type=int, default=512, help="generation budget of the generative tasks")
    a("--mmlu-epochs", type=int, default=3)
    a("--gsm8k-epochs", type=int, default=4)
    # not in the reference: where things are, and how to run
    a("--checkpoint-dir", required=True, help="the base checkpoint: a pretrain artifact's checkpoint/ directory")
    a("--tokenizer-dir", required=True, help="a tokenizer artifact (tokenizer.tiktoken, tokenizer.json, token_bytes.pt)")
    a("--out-dir", required=True, help="checkpoints/, metrics.jsonl, summary.json go here")
    a("--data", nargs="+", default=None, metavar="FILE",
      help="jsonl/parquet files of {'messages': [...]} rows instead of the reference hub mixture")
    a("--source", action="append", default=[], metavar="NAME=PATH", type=_source_arg,
      help="replace one source of the hub mixture (smoltalk, mmlu or gsm8k) by a local jsonl/parquet file in its "
           "row format; repeatable")
    a("--chat-eval-dir", "--data-dir-chat-eval", dest="chat_eval_dir", default=None,
      help="ChatCORE task files laid out like shared/data/chat_eval (default: the hub)")
    a("--save-every", type=int, default=-1, help="checkpoint period in steps (-1 = only the last step)")
    a("--keep-checkpoints", type=int, default=2, help="complete checkpoints kept on disk (older ones are pruned)")
    a("--resume", default="auto", choices=["auto", "none"], help="auto: continue from the last complete checkpoint")
    a("--compile", default="auto", choices=["auto", "on", "off"],
      help="torch.compile of the model and the optimizer (auto: on CUDA; on CPU when the run is long enough to pay)")
    add_run_options(p)  # --wandb-*, --attention (model/loop.py)
    args = p.parse_args(argv)
    args.sources = dict(args.__dict__.pop("source"))  # NAME=PATH items; a repeated NAME keeps the last
    if args.sources and args.data:
        p.error("--data replaces the whole mixture, --source one part of it; fix: give one or the other")
    return args


# ---------------------------------------------------------------------------------------------
# pure helpers (unit-tested)

def resolve_hyperparameters(cli: dict, base_meta: dict) -> tuple[dict, dict, dict]:
    """(resolved values, source of each ('cli' | 'checkpoint' | 'fallback'), overrides) for the inherited options.

    Batch geometry comes from the base meta's top level (the resolved total batch size, not -1), LRs from its
    user_config (the raw CLI values, before any batch-size scaling). An explicit value that differs from the
    checkpoint's is an override: {key: {"value": ours, "checkpoint": theirs}}.
    """
    user_config = base_meta.get("user_config") or {}
    resolved, sources, overrides = {}, {}, {}
    for key, fallback in (*FROM_META.items(), *FROM_USER_CONFIG.items()):
        if key in FROM_META:
            base_value = base_meta.get(key)
        else:  # an SFT checkpoint's user_config holds None for inherited LRs; its resolved values are kept apart
            base_value = user_config.get(key)
            if base_value is None:
                base_value = (base_meta.get("resolved") or {}).get(key)
        ours = cli.get(key)
        if ours is not None:
            resolved[key], sources[key] = ours, "cli"
            if base_value is not None and ours != base_value:
                overrides[key] = {"value": ours, "checkpoint": base_value}
        elif base_value is not None:
            resolved[key], sources[key] = base_value, "checkpoint"
        else:
            resolved[key], sources[key] = fallback, "fallback"
    for key in FROM_META:
        if not isinstance(resolved[key], int) or resolved[key] < 1:
            raise SystemExit(f"{key}={resolved[key]!r} must be a positive integer; fix: pass --{key.replace('_', '-')}")
    for key in FROM_USER_CONFIG:
        if not resolved[key] > 0:
            raise SystemExit(f"{key}={resolved[key]!r} must be > 0; fix: pass --{key.replace('_', '-')}")
    return resolved, sources, overrides


def grad_accum_steps(total_batch_size: int, device_batch_size: int, max_seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step; the total batch must be a whole number of world micro-batches."""
    world_tokens = device_batch_size * max_seq_len * world_size
    if total_batch_size % world_tokens:
        raise SystemExit(
            f"total batch size {total_batch_size:,} is not divisible by device_batch_size x max_seq_len x world size "
            f"= {device_batch_size} x {max_seq_len} x {world_size} = {world_tokens:,}; fix: pass --total-batch-size as "
            f"a multiple of {world_tokens:,} (e.g. {max(1, round(total_batch_size / world_tokens)) * world_tokens:,}) "
            "or change --device-batch-size/--max-seq-len")
    return total_batch_size // world_tokens


def lr_multiplier(progress: float, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Warmup to 1 over the first warmup_ratio of progress, constant, then linear to final_lr_frac (docs/evaluation.md#sft-schedule)."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1 - warmdown_ratio:
        return 1.0
    q = (progress - (1 - warmdown_ratio)) / warmdown_ratio
    return (1 - q) + q * final_lr_frac


def muon_momentum(step: int) -> float:
    """0.85 -> 0.95 linearly over the first 300 steps, then 0.95."""
    frac = min(step / MUON_MOMENTUM_WARMUP, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def masked_mean_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the supervised targets (y >= 0); 0 for a micro-batch of padding only
    (possible with conversations longer than a row), where a plain mean would be NaN."""
    losses = model(x, y, loss_reduction="none")
    return losses.sum() / (y >= 0).sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# set-up pieces

def warm_start_optimizer(optimizer, base_dir: Path, base_step: int, base_world: int | None, rank: int, world: int,
                         device, say) -> bool:
    """Load this rank's base optimizer shard, keeping the fresh LRs; False (and a warning) when it cannot."""
    path = base_dir / f"optim_{base_step:06d}_rank{rank}.pt"
    usable = path.exists() and (base_world is None or base_world == world)
    if dist.is_available() and dist.is_initialized():  # all ranks warm-start, or none
        flag = torch.tensor(int(usable), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        usable = bool(flag.item())
    if not usable:
        if base_world is not None and base_world != world:
            say(f"warning: the base optimizer state was written by {base_world} ranks, this run has {world} "
                "(state is sharded per rank); starting from a fresh optimizer")
        else:
            say(f"warning: no base optimizer state {path.name} in {base_dir}; starting from a fresh optimizer")
        return False
    fresh = [group["lr"] for group in optimizer.param_groups]
    # load_state_dict also restores the base run's group hyper-parameters (Muon weight decay ends at its
    # final, ~0 value); only the learning rates are put back
    optimizer.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    for group, lr in zip(optimizer.param_groups, fresh):
        group["lr"] = lr
        group["initial_lr"] = lr
    say(f"warm-started the optimizer from {path}")
    return True


def trim_metrics(path: Path, resume_step: int) -> None:
    """Drop what a killed run logged after its checkpoint at resume_step: training records carry the number of
    steps done (<= resume_step were before the checkpoint), evaluation records the step they ran at (the
    evaluations at resume_step run again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        if line:
            record = json.loads(line)
            limit = resume_step + 1 if "train/loss" in record else resume_step
            if record.get("step", 0) < limit:
                kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def run_chatcore(model, tokenizer, args, batch_size: int) -> dict[str, dict]:
    """ChatCORE's five tasks on the uncompiled model: categorical ones limited by --chatcore-max-cat,
    generative ones by --chatcore-max-sample."""
    from model.chat_scoring import run_chat_eval

    def limit(n: int) -> int | None:
        return None if n < 0 else n

    results = run_chat_eval(model, tokenizer, list(CATEGORICAL_TASKS), args.chat_eval_dir,
                            max_problems=limit(args.chatcore_max_cat), batch_size=batch_size)
    results.update(run_chat_eval(model, tokenizer, list(GENERATIVE_TASKS), args.chat_eval_dir,
                                 max_problems=limit(args.chatcore_max_sample),
                                 max_new_tokens=args.chatcore_max_new_tokens))
    return results


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = TrainingRun(args)  # device, process group, out dir, cancel rules, run-dir lock (model/loop.py)
    say, device, rank, world = run.say, run.device, run.rank, run.world

    # --- the base checkpoint and what it hands down
    base_dir = Path(args.checkpoint_dir)
    if not base_dir.is_dir():
        raise SystemExit(f"--checkpoint-dir {base_dir} does not exist; fix: point it at a pretrain artifact's "
                         "checkpoint/ directory (or a training run's checkpoints/)")
    base_step = ckpt.latest_model_step(base_dir) if args.model_step is None else args.model_step
    if not (base_dir / f"meta_{base_step:06d}.json").exists():
        raise SystemExit(f"no meta_{base_step:06d}.json in {base_dir}; fix: pass an existing --model-step")
    base_meta = ckpt.read_meta(base_dir, base_step)
    hp, sources, overrides = resolve_hyperparameters(vars(args), base_meta)
    T, B, total_batch_size = hp["max_seq_len"], hp["device_batch_size"], hp["total_batch_size"]
    for key, value in hp.items():
        say(f"{key:17s}: {value} ({'from the base checkpoint' if sources[key] == 'checkpoint' else sources[key]})")
    for key, o in overrides.items():
        say(f"override: {key} = {o['value']} (base checkpoint: {o['checkpoint']})")
    accum = grad_accum_steps(total_batch_size, B, T, world)

    tokenizer = Tokenizer.load(args.tokenizer_dir)
    token_bytes = load_token_bytes(args.tokenizer_dir, device=device)
    config = GPTConfig(**{**base_meta["model_config"], "sequence_len": T})  # windows and rotary sized for T
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise SystemExit(f"the tokenizer in {args.tokenizer_dir} has {tokenizer.get_vocab_size()} tokens, the base model "
                         f"{config.vocab_size}; fix: pass the tokenizer the base model was trained with")

    # --- data: fail on bad files before any model work
    from model.sft_data import sft_mixture

    mixture = dict(data=args.data, mmlu_epochs=args.mmlu_epochs, gsm8k_epochs=args.gsm8k_epochs, sources=args.sources)
    train_ds, val_ds = sft_mixture("train", **mixture), sft_mixture("val", **mixture)
    say(f"conversations: {len(train_ds):,} train, {len(val_ds):,} val")

    # --- model: the SFT run's own last complete checkpoint, else the base weights
    resume = run.resume(args.resume)
    if resume is not None:
        model = build_model(config, device, resume.model_state)
    else:
        model = build_model(config, device, ckpt.load_model_state(base_dir, base_step, device))
        say(f"base model: step {base_step} of {base_dir}")
    model.train()
    orig_model = model
    # planned steps: --num-iterations, else at most one step per B x world x accum conversations (one pass)
    planned_steps = args.num_iterations if args.num_iterations > 0 else len(train_ds) // (B * world * accum)
    model, use_compile = run.compile(model, planned_steps)
    flops_per_token = orig_model.estimate_flops()
    say(f"Estimated FLOPs per token: {flops_per_token:e}")
    say(f"Total batch size {total_batch_size:,} => gradient accumulation steps: {accum}")

    # --- optimizer: fresh LRs, no weight decay, warm state from the base run, then x init_lr_frac
    optimizer = orig_model.setup_optimizer(unembedding_lr=hp["unembedding_lr"], embedding_lr=hp["embedding_lr"],
                                           matrix_lr=hp["matrix_lr"], weight_decay=0.0, compile=use_compile)
    warm_started = resume.meta.get("optimizer_warm_start", False) if resume else False
    loader_state, first_batch = run.restore(resume, optimizer)  # its LRs are already the scaled SFT ones
    if resume is None:
        if args.load_optimizer:
            warm_started = warm_start_optimizer(optimizer, base_dir, base_step, base_meta.get("world_size"),
                                                rank, world, device, say)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * args.init_lr_frac
            group["initial_lr"] = group["lr"]

    num_iterations = args.num_iterations
    train_loader = SFTLoader(train_ds, tokenizer, B, T, rank=rank, world_size=world, device=device,
                             on_stall="pad" if num_iterations > 0 else "error", name="train", state=loader_state)
    x, y = run.first_batch(first_batch, train_loader)

    def fresh_val_batches():
        return SFTLoader(val_ds, tokenizer, B, T, rank=rank, world_size=world, device=device, on_stall="pad", name="val")

    eval_steps = max(1, args.eval_tokens // (B * T * world))
    step = run.first_step
    progress = run.loop_state.get("progress", 0.0)  # kept monotone: the LR schedule never moves backwards
    chat = run.loop_state.get("chat") or {}  # last ChatCORE: {"accuracy": {...}, "chatcore": ..., "chatcore_cat": ...}
    if run.master and run.resume_step is not None:
        trim_metrics(run.out_dir / "metrics.jsonl", run.resume_step)
    metrics = run.start_logging("speedrun-sft", keep_before_step=math.inf)

    while True:
        last_step = train_loader.exhausted or (num_iterations > 0 and step >= num_iterations)
        cancel, last_step = run.stop.agreed(device, also=last_step)  # every rank stops at the same step
        cancel = cancel and not last_step
        flops_so_far = flops_per_token * total_batch_size * step

        if not cancel and args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            run.validate(model, fresh_val_batches(), eval_steps, token_bytes, step, flops_so_far)

        if not cancel and args.chatcore_every > 0 and (last_step or (step > 0 and step % args.chatcore_every == 0)):
            from model.chat_data import chatcore

            orig_model.eval()
            results = run_chatcore(orig_model, tokenizer, args, B)
            orig_model.train()
            accuracy = {name: r["accuracy"] for name, r in results.items()}
            chat = {"accuracy": accuracy, **chatcore(accuracy)}
            shown = "n/a" if chat["chatcore"] is None else f"{chat['chatcore']:.4f}"
            say(f"Step {step:05d} | ChatCORE: {shown} | " + " | ".join(f"{k}: {v:.4f}" for k, v in accuracy.items()))
            metrics.log({"step": step, "total_training_flops": flops_so_far, "chatcore_metric": chat["chatcore"],
                         "chatcore_cat": chat["chatcore_cat"], **{f"chatcore/{k}": v for k, v in accuracy.items()}})

        if run.should_save(step, last_step, cancel, args.save_every):
            run.save(step, model=orig_model, optimizer=optimizer, loader=train_loader, batch=(x, y), config=config,
                     meta={"device_batch_size": B, "max_seq_len": T, "total_batch_size": total_batch_size,
                           "world_size": world, "num_iterations": num_iterations, "resolved": hp,
                           "base_checkpoint": {"dir": str(base_dir), "step": base_step},
                           "optimizer_warm_start": warm_started},
                     loop_state={"progress": progress, "chat": chat}, keep=args.keep_checkpoints)
        if cancel:
            run.exit_saved(step)
        if last_step:
            break

        run.step_begin()
        for _ in range(accum):
            loss = masked_mean_loss(model, x, y)
            train_loss = loss.detach()
            (loss / accum).backward()
            x, y = next(train_loader)
            if num_iterations <= 0:  # the last step's batches may overshoot the data: progress stays <= 1
                progress = max(progress, min(train_loader.approx_progress, 1.0))
        if num_iterations > 0:
            progress = max(progress, step / num_iterations)
        lrm = lr_multiplier(progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        momentum = muon_momentum(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss_f = train_loss.item()
        check_finite(train_loss_f, step, {"matrix_lr": hp["matrix_lr"], "embedding_lr": hp["embedding_lr"],
                                          "unembedding_lr": hp["unembedding_lr"], "init_lr_frac": args.init_lr_frac})
        dt = run.step_end(step)
        step += 1  # incremented before logging: a step's record carries the count of steps done
        debiased = run.smooth_loss(train_loss_f, step)
        tok_per_sec, mfu = run.rates(dt, total_batch_size, flops_per_token)
        total_training_time = run.total_training_time
        say(f"step {step:05d} ({100 * progress:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | "
            f"tok/sec: {tok_per_sec:,} | mfu: {mfu:.2f} | epoch: {train_loader.epoch} | "
            f"total time: {total_training_time / 60:.2f}m")
        metrics.log({"step": step, "total_training_flops": flops_per_token * total_batch_size * step,
                     "total_training_time": total_training_time, "train/loss": debiased, "train/raw_loss": train_loss_f,
                     "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu,
                     "train/epoch": train_loader.epoch}, wandb_too=step % WANDB_EVERY == 0)
        run.after_step(step)  # GC frozen after the first step, avoiding long pauses

    # --- summary
    mean_tok_per_sec, mean_mfu = run.mean_rates(total_batch_size, flops_per_token)
    summary = {
        "step": step,
        "val_bpb": run.val_bpb,
        "min_val_bpb": None if math.isinf(run.min_val_bpb) else run.min_val_bpb,
        "train_loss": run.smooth_train_loss / (1 - 0.9 ** step) if step else None,
        "total_training_time": run.total_training_time,
        "total_training_flops": flops_per_token * total_batch_size * step,
        "chatcore": chat.get("chatcore"), "chatcore_cat": chat.get("chatcore_cat"),
        "chat_accuracy": chat.get("accuracy"),
        "num_conversations": len(train_ds), "num_val_conversations": len(val_ds),
        "conversations_consumed": train_loader.consumed, "epoch": train_loader.epoch, "progress": progress,
        "num_iterations": num_iterations, "timed_steps": run.timed_steps,
        "mfu": mean_mfu, "tok_per_sec": mean_tok_per_sec,
        "max_seq_len": T, "device_batch_size": B, "total_batch_size": total_batch_size, "grad_accum_steps": accum,
        "hyperparameters": hp, "inherited": sorted(k for k, s in sources.items() if s == "checkpoint"),
        "overrides": overrides, "optimizer_warm_start": warm_started,
        "base_checkpoint": {"dir": str(base_dir), "step": base_step},
        "flops_per_token": flops_per_token, "world_size": world,
        **run.environment(use_compile),
    }
    return run.finish(summary)


if __name__ == "__main__":
    main()
