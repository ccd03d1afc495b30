"""Base pretraining: the torchrun entry point (the reference's scripts/base_train.py; docs/model.md#training-loop).

    torchrun --standalone --nproc_per_node=8 -m model.train --depth=24 --target-param-data-ratio=8 \
        --device-batch-size=16 --fp8 --out-dir=runs/d24 --data-dir=<shards artifact> --tokenizer-dir=<tokenizer artifact>

Every reference option with the same default, plus --out-dir/--data-dir/--tokenizer-dir and --resume auto.
Writes to --out-dir: checkpoints/ (every --save-every steps and the last step, each completed by a marker),
metrics.jsonl (one object per logged step or eval, rank 0), summary.json (the leaderboard keys). A run
restarted with --resume auto continues from the last complete checkpoint: model, optimizer, loader
position, RNG, step and accumulated total_training_time; on CPU it ends bitwise where an uninterrupted
run ends. SIGTERM (Ctrl-C in torchrun, a cancel) finishes the step in flight, saves a checkpoint and exits
75; a non-finite loss stops the run with an error (model/run_control.py). Prefect never appears here: a
researcher runs this alone.

main() reads top to bottom like the reference's script: the plan, the model, the optimizer and data, then the
loop (evaluations at their cadence, checkpoint, one optimizer step) and the summary. The machinery it shares
with model/sft.py (process set-up, resume, checkpoint save and pruning, step timing and GC, wandb and
metrics.jsonl, summary.json) is model/loop.py's TrainingRun.
"""

from __future__ import annotations

import argparse
import math
import os
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # before torch initialises CUDA

from model.data import read_shard_paths  # noqa: E402
from model.dataloader import BestFitLoader, val_loader  # noqa: E402
from model.gpt import GPTConfig, build_model  # noqa: E402
from model.loop import TrainingRun, add_run_options  # noqa: E402
from model.schedules import get_lr_multiplier, get_muon_momentum, get_weight_decay  # noqa: E402
from model.run_control import check_finite  # noqa: E402
from model.sizing import plan_training  # noqa: E402
from model.tokenizer import Tokenizer, load_token_bytes  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.train", description="Pretrain the base GPT.")
    a = p.add_argument
    a("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
    a("--device-type", default="", help="cuda|cpu|mps; empty = autodetect")
    a("--fp8", action="store_true", help="FP8 training of eligible Linear layers (CUDA only)")
    a("--fp8-recipe", default="tensorwise", choices=["tensorwise"], help="FP8 scaling (tensorwise: one scale per tensor)")
    a("--depth", type=int, default=20)
    a("--aspect-ratio", type=int, default=64)
    a("--head-dim", type=int, default=128)
    a("--max-seq-len", type=int, default=2048)
    a("--window-pattern", default="SSSL")
    a("--num-iterations", type=int, default=-1)
    a("--target-flops", type=float, default=-1.0)
    a("--target-param-data-ratio", type=float, default=12.0)
    a("--device-batch-size", type=int, default=32)
    a("--total-batch-size", type=int, default=-1)
    a("--embedding-lr", type=float, default=0.3)
    a("--unembedding-lr", type=float, default=0.008)
    a("--weight-decay", type=float, default=0.28)
    a("--matrix-lr", type=float, default=0.02)
    a("--scalar-lr", type=float, default=0.5)
    a("--warmup-steps", type=int, default=40)
    a("--warmdown-ratio", type=float, default=0.65)
    a("--final-lr-frac", type=float, default=0.05)
    a("--resume-from-step", type=int, default=-1)
    a("--eval-every", type=int, default=250)
    a("--eval-tokens", type=int, default=80 * 524288)
    a("--core-metric-every", type=int, default=2000)
    a("--core-metric-max-per-task", type=int, default=500)
    a("--sample-every", type=int, default=2000)
    a("--save-every", type=int, default=-1)
    a("--model-tag", default=None)
    # not in the reference: where things are, and how to run
    a("--out-dir", required=True, help="checkpoints/, metrics.jsonl, summary.json go here")
    a("--data-dir", required=True, help="a shards artifact (shards.json) or a directory of shard_*.parquet (last = val)")
    a("--tokenizer-dir", required=True, help="a tokenizer artifact (tokenizer.tiktoken, tokenizer.json, token_bytes.pt)")
    a("--bundle-dir", default=None, help="CORE eval bundle, needed when --core-metric-every > 0")
    a("--allow-missing-tasks", action="store_true", help="CORE over the bundle's tasks present (e.g. 21/22)")
    a("--resume", default="auto", choices=["auto", "none"], help="auto: continue from the last complete checkpoint")
    a("--data-streams", type=int, default=-1, help="data streams the batch is split into; -1 = world size")
    a("--compile", default="auto", choices=["auto", "on", "off"],
      help="torch.compile of the model and the optimizer (auto: on CUDA; on CPU when the run is long enough to pay)")
    a("--keep-checkpoints", type=int, default=2, help="complete checkpoints kept on disk (older ones are pruned)")
    add_run_options(p)  # --wandb-*, --attention (model/loop.py)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = TrainingRun(args)  # device, process group, out dir, cancel rules, run-dir lock (model/loop.py)
    say, device, rank, world, master = run.say, run.device, run.rank, run.world, run.master

    tokenizer = Tokenizer.load(args.tokenizer_dir)
    token_bytes = load_token_bytes(args.tokenizer_dir, device=device)
    train_paths, val_path = read_shard_paths(args.data_dir)
    vocab_size = tokenizer.get_vocab_size()

    plan = plan_training(
        depth=args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
        window_pattern=args.window_pattern, vocab_size=vocab_size, device_batch_size=args.device_batch_size,
        total_batch_size=args.total_batch_size, world_size=world, num_iterations=args.num_iterations,
        target_flops=args.target_flops, target_param_data_ratio=args.target_param_data_ratio,
        weight_decay=args.weight_decay, warmdown_ratio=args.warmdown_ratio)
    num_iterations, total_batch_size, grad_accum_steps = plan.num_iterations, plan.total_batch_size, plan.grad_accum_steps

    # --- model: fresh, or the last complete checkpoint's (a damaged newest one falls back to the one before)
    config = GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=args.depth,
                       n_head=plan.n_head, n_kv_head=plan.n_head, n_embd=plan.model_dim,
                       window_pattern=args.window_pattern.upper())
    resume = run.resume(args.resume, from_step=args.resume_from_step)
    model = build_model(config, device, resume.model_state if resume else None)

    fp8_enabled = args.fp8 and device.type == "cuda"
    if args.fp8 and not fp8_enabled:
        say("warning: --fp8 needs CUDA; training in plain precision")
    if fp8_enabled:
        from ops.fp8 import convert_to_float8_training

        converted = convert_to_float8_training(model)
        say(f"FP8: converted {converted} linear layers")
    orig_model = model
    model, use_compile = run.compile(model, num_iterations)

    counts = orig_model.num_scaling_params()
    for key, value in counts.items():
        say(f"{key:24s}: {value:,}")
    flops_per_token = orig_model.estimate_flops()
    say(f"Estimated FLOPs per token: {flops_per_token:e}")
    say(f"Calculated number of iterations from target: {num_iterations:,}")
    say(f"Total batch size {total_batch_size:,} => gradient accumulation steps: {grad_accum_steps}")
    say(f"Total training tokens: {plan.total_tokens:,} (tokens:params {plan.tokens_per_param:.2f}), "
        f"total FLOPs {flops_per_token * plan.total_tokens:e}")

    # --- optimizer and data (a resumed run continues where its loader stood, with the batch it had prefetched)
    lr_scale = plan.batch_lr_scale
    optimizer = orig_model.setup_optimizer(
        unembedding_lr=args.unembedding_lr * lr_scale, embedding_lr=args.embedding_lr * lr_scale,
        matrix_lr=args.matrix_lr * lr_scale, weight_decay=plan.weight_decay_scaled, scalar_lr=args.scalar_lr * lr_scale,
        compile=use_compile)

    num_streams = args.data_streams if args.data_streams > 0 else world
    if num_streams % world:
        raise SystemExit(f"--data-streams={num_streams} must be a multiple of the world size {world}")
    if grad_accum_steps * world % num_streams:
        raise SystemExit(f"--data-streams={num_streams} must divide the micro-batches per step ({grad_accum_steps * world})")
    loader_state, first_batch = run.restore(resume, optimizer)
    train_loader = BestFitLoader(tokenizer, train_paths, args.device_batch_size, args.max_seq_len,
                                 streams=list(range(rank, num_streams, world)), num_streams=num_streams,
                                 device=device, state=loader_state)
    x, y = run.first_batch(first_batch, train_loader)

    def fresh_val_batches():
        return val_loader(tokenizer, val_path, args.device_batch_size, args.max_seq_len, rank, world, device,
                          num_streams=num_streams)

    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world))
    step = run.first_step
    metrics = run.start_logging("speedrun", keep_before_step=step)
    if fp8_enabled:
        from ops.fp8 import disable_fp8
    else:
        disable_fp8 = lambda m: nullcontext()  # noqa: E731
    bundle, core_metric = None, run.loop_state.get("core_metric")
    if args.core_metric_every > 0:
        if not args.bundle_dir:
            raise SystemExit("--core-metric-every > 0 needs --bundle-dir (the CORE eval bundle); "
                             "or pass --core-metric-every=-1")
        from model.core_eval import evaluate_core
        from model.eval_bundle import load_bundle

        bundle = load_bundle(Path(args.bundle_dir), allow_missing=args.allow_missing_tasks)

    while True:
        last_step = step == num_iterations
        cancel = not last_step and run.stop.agreed(device)[0]  # every rank stops at the same step
        flops_so_far = flops_per_token * total_batch_size * step

        if not cancel and args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            run.validate(model, fresh_val_batches(), eval_steps, token_bytes, step, flops_so_far,
                         context=disable_fp8(orig_model))

        if not cancel and bundle is not None and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            with disable_fp8(orig_model):  # CORE runs on the uncompiled model, in bf16
                core = evaluate_core(orig_model, tokenizer, bundle, max_per_task=args.core_metric_max_per_task,
                                     device=device, rank=rank, world_size=world, log=say)
            orig_model.train()
            core_metric = core["core_metric"]
            say(f"Step {step:05d} | CORE metric: {core_metric:.4f}")
            metrics.log({"step": step, "total_training_flops": flops_so_far, "core_metric": core_metric,
                         "centered_results": core["centered_results"]})

        if not cancel and args.sample_every > 0 and master and (last_step or (step > 0 and step % args.sample_every == 0)):
            from model.engine import SAMPLE_PROMPTS, Engine  # samples only go to the log: not in the stage key

            orig_model.eval()
            with disable_fp8(orig_model):
                prompts = [tokenizer.encode(p, prepend=tokenizer.get_bos_token_id()) for p in SAMPLE_PROMPTS]
                completions = Engine(orig_model, tokenizer).generate_prompts(prompts, max_tokens=16)
                for prompt, tokens in zip(SAMPLE_PROMPTS, completions):
                    say(f"sample | {prompt}{tokenizer.decode(tokens)}")
            orig_model.train()

        if run.should_save(step, last_step, cancel, args.save_every):
            run.save(step, model=orig_model, optimizer=optimizer, loader=train_loader, batch=(x, y), config=config,
                     meta={"device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
                           "total_batch_size": total_batch_size, "world_size": world, "num_iterations": num_iterations},
                     loop_state={"core_metric": core_metric}, keep=args.keep_checkpoints)
        if cancel:
            run.exit_saved(step)
        if last_step:
            break

        run.step_begin()
        for _ in range(grad_accum_steps):
            loss = model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum_steps).backward()
            x, y = next(train_loader)
        lrm = get_lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = get_muon_momentum(step, num_iterations, args.warmdown_ratio)
                group["weight_decay"] = get_weight_decay(step, num_iterations, plan.weight_decay_scaled)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss_f = train_loss.item()
        check_finite(train_loss_f, step, {"matrix_lr": args.matrix_lr, "embedding_lr": args.embedding_lr,
                                          "unembedding_lr": args.unembedding_lr, "scalar_lr": args.scalar_lr,
                                          "warmup_steps": args.warmup_steps, "depth": args.depth})
        dt = run.step_end(step)

        debiased = run.smooth_loss(train_loss_f, step + 1)
        tok_per_sec, mfu = run.rates(dt, total_batch_size, flops_per_token)
        total_training_time, timed_steps = run.total_training_time, run.timed_steps
        eta = (num_iterations - step) * total_training_time / timed_steps if timed_steps else float("nan")
        say(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | loss: {debiased:.6f} | "
            f"lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | bf16_mfu: {mfu:.2f} | "
            f"total time: {total_training_time / 60:.2f}m | eta: {eta / 60:.1f}m")
        metrics.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": total_training_time,
                     "train/loss": debiased, "train/raw_loss": train_loss_f, "train/lrm": lrm, "train/dt": dt,
                     "train/tok_per_sec": tok_per_sec, "train/mfu": mfu}, wandb_too=step % 100 == 0)
        step += 1
        run.after_step(step)  # GC frozen after the first step, avoiding ~500 ms pauses

    # --- summary (leaderboard keys)
    mean_tok_per_sec, mean_mfu = run.mean_rates(total_batch_size, flops_per_token)
    summary = {
        "total_training_time": run.total_training_time,
        "total_training_flops": flops_per_token * total_batch_size * num_iterations,
        "min_val_bpb": None if math.isinf(run.min_val_bpb) else run.min_val_bpb,
        "val_bpb": run.val_bpb,
        "core_metric": core_metric,
        "step": num_iterations,
        "mfu": mean_mfu,
        "tok_per_sec": mean_tok_per_sec,
        "final_train_loss": run.smooth_train_loss / (1 - 0.9 ** max(num_iterations, 1)),
        "timed_steps": run.timed_steps,
        "depth": args.depth, "model_dim": plan.model_dim, "num_params": counts["total"],
        "num_scaling_params": plan.scaling_params, "flops_per_token": flops_per_token,
        "total_batch_size": total_batch_size, "grad_accum_steps": grad_accum_steps, "world_size": world,
        **run.environment(use_compile, fp8=fp8_enabled),
        "final_step": step,
    }
    return run.finish(summary)


if __name__ == "__main__":
    main()
