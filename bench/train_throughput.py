"""Benchmark: training-step throughput of the GPT at a given depth on the current device.

Times full training steps (forward, backward, MuonAdamW step) on random tokens after a warm-up, in one
process: no shards, tokenizer or Prefect needed, so it runs anywhere `model/` runs (e.g. a GPU box with
`PYTHONPATH=.`).

    python -m bench.train_throughput --depth 12                       # CPU or GPU, prints JSON
    python -m bench.train_throughput --depth 12 --fp8-compare          # CUDA: bf16 vs FP8 steps, same run
    python -m bench.train_throughput --depth 4 --max-seq-len 256 --device-batch-size 8   # CPU-sized
    python -m bench.train_throughput --compare-compile                 # eager vs compiled model.train, real data

--compare-compile runs the real entry point (`python -m model.train`, real shards, a real tokenizer) twice,
`--compile=off` then `--compile=on`, one right after the other, and reads each run's metrics.jsonl. Defaults:
d4 / seq 256 / device batch 8 / total batch 4096 / vocab 32768 / window L / head dim 64, 60 steps, the
smoke/cpu presets' small-batch LRs (--lr-multiplier); the tokenizer is trained on the first shard of
--data-dir unless --tokenizer-dir is given. Keys:
eager_ms_per_step, compiled_ms_per_step (medians over steps >= 11), eager_tok_per_sec, compiled_tok_per_sec,
compile_first_step_s (the compiled run's step 0), eager_first_step_s, speedup, eager_val_bpb,
compiled_val_bpb (at the last step), val_bpb_rel_diff, break_even_steps (the step count at which compiling
has paid for its first step). Both runs use an empty inductor cache, so the compiled first step includes the
whole compile; --warm-inductor-cache uses the user's instead.

Keys: device, depth, tok_per_sec, ms_per_step (medians), and on CUDA mfu (bf16 dense peak, as the reference)
and, with --fp8-compare, fp8_speedup (bf16 ms / fp8 ms for the model) and fp8_mlp_gemm_speedup_d26
(fwd+bwd of the d26 MLP GEMM 65536x1664 @ 1664x6656, the reference's microbenchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from model.common import COMPUTE_DTYPE, autodetect_device_type, get_peak_flops, retain_freed_cpu_memory
from model.gpt import GPTConfig, build_model
from model.sizing import ModelShape


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(compiled, model, optimizer, x, y, device) -> tuple[float, torch.Tensor]:
    """One timed training step, forward to optimizer step: (seconds, loss)."""
    sync(device)
    t0 = time.perf_counter()
    loss = compiled(x, y)
    loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0, loss


def build(args, device, fp8: bool):
    shape = ModelShape.from_depth(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                                  vocab_size=args.vocab_size, seq_len=args.max_seq_len, window_pattern=args.window_pattern)
    config = GPTConfig(sequence_len=args.max_seq_len, vocab_size=args.vocab_size, n_layer=args.depth,
                       n_head=shape.n_head, n_kv_head=shape.n_head, n_embd=shape.model_dim,
                       window_pattern=args.window_pattern)
    torch.manual_seed(42)
    model = build_model(config, device)
    if fp8:
        from ops.fp8 import convert_to_float8_training

        convert_to_float8_training(model)
    optimizer = model.setup_optimizer(compile=args.compile)
    compiled = torch.compile(model, dynamic=False) if args.compile else model
    return model, compiled, optimizer


def time_steps(args, device, fp8: bool) -> dict:
    model, compiled, optimizer = build(args, device, fp8)
    B, T = args.device_batch_size, args.max_seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)
    times = []
    for i in range(args.warmup + args.steps):
        seconds, loss = train_step(compiled, model, optimizer, x, y, device)
        if i >= args.warmup:
            times.append(seconds)
    dt = statistics.median(times)
    result = {"ms_per_step": dt * 1000, "tok_per_sec": B * T / dt, "flops_per_token": model.estimate_flops(),
              "final_loss": loss.item()}
    if device.type == "cuda":
        result["mfu"] = 100 * result["flops_per_token"] * result["tok_per_sec"] / get_peak_flops(torch.cuda.get_device_name(device))
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    del model, compiled, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def mlp_gemm_speedup(device, repeats: int = 20) -> float:
    """bf16 vs FP8 fwd+bwd of the d26 MLP up-projection GEMM, both compiled."""
    import torch.nn as nn
    from ops.fp8 import Float8Linear

    def bench(layer) -> float:
        fn = torch.compile(lambda a: layer(a).float().square().mean())
        a = torch.randn(65536, 1664, device=device, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3):
            fn(a).backward()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(a).backward()
        sync(device)
        return (time.perf_counter() - t0) / repeats

    base = nn.Linear(1664, 6656, bias=False, device=device)
    bf16_s = bench(lambda a: a @ base.weight.to(torch.bfloat16).t())
    fp8_s = bench(Float8Linear.from_linear(base))
    return bf16_s / fp8_s


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_PRETRAIN = REPO_ROOT.parent / "shared" / "data" / "pretrain"
TIMED_FROM_STEP = 11  # model.train's own rule: steps 0..10 (compile warm-up) are not timed
REFERENCE_LRS = {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "scalar_lr": 0.5}
# The smoke and cpu presets' LRs: 8x the reference's, whose sqrt(batch / 2^19) scaling leaves tiny batches
# far behind the unscaled smear/backout LR; training then spikes and is chaotic (two eager runs at 1 and 2
# threads end ~10% apart in loss), so eager-vs-compiled val bpb would measure chaos, not compile.
SMALL_BATCH_LR_MULTIPLIER = 8.0


def bench_tokenizer(data_dir: Path, vocab_size: int, out: Path, max_chars: int = 20_000_000) -> Path:
    """A real BPE tokenizer of `vocab_size` trained on the first shard (what --tokenizer-dir would give)."""
    from model.data import iter_documents
    from model.tokenizer import train_tokenizer, training_texts

    shards = sorted(data_dir.glob("shard_*.parquet"))
    if len(shards) < 2:
        raise SystemExit(f"--compare-compile needs at least 2 shard_*.parquet in {data_dir} (last = val); "
                         "fix: pass --data-dir")
    texts = training_texts(iter_documents(shards[:1]), max_chars=max_chars, doc_cap=10_000)
    train_tokenizer(texts, vocab_size=vocab_size).save(out)
    return out


def train_run(args, out_dir: Path, tokenizer_dir: Path, compile_mode: str, inductor_cache: Path | None) -> dict:
    """One `python -m model.train` run; its per-step times and val bpb from metrics.jsonl. `inductor_cache`:
    an empty TORCHINDUCTOR_CACHE_DIR, so the first step pays the whole compile (None: the user's cache)."""
    cmd = [sys.executable, "-m", "model.train", f"--depth={args.depth}", f"--aspect-ratio={args.aspect_ratio}",
           f"--head-dim={args.head_dim}", f"--max-seq-len={args.max_seq_len}",
           f"--window-pattern={args.window_pattern}", f"--device-batch-size={args.device_batch_size}",
           f"--total-batch-size={args.total_batch_size}", f"--num-iterations={args.steps}",
           f"--eval-every={args.steps}", f"--eval-tokens={args.eval_tokens}", "--core-metric-every=-1",
           "--sample-every=-1", f"--compile={compile_mode}", "--run=dummy", "--wandb-mode=disabled",
           *(f"--{name.replace('_', '-')}={value * args.lr_multiplier}" for name, value in REFERENCE_LRS.items()),
           "--resume=none", f"--out-dir={out_dir}", f"--data-dir={args.data_dir}", f"--tokenizer-dir={tokenizer_dir}"]
    if args.device_type:
        cmd.append(f"--device-type={args.device_type}")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    if inductor_cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"model.train --compile={compile_mode} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    dts = {r["step"]: r["train/dt"] for r in records if "train/dt" in r}
    bpb = {r["step"]: r["val/bpb"] for r in records if "val/bpb" in r}
    timed = [dt for step, dt in dts.items() if step >= TIMED_FROM_STEP]
    ms = 1000 * statistics.median(timed)
    return {"ms_per_step": ms, "tok_per_sec": args.total_batch_size / (ms / 1000), "first_step_s": dts[0],
            "val_bpb": bpb[args.steps], "val_bpb_step0": bpb[0], "wall_s": wall,
            "compile_fallback": "running it eagerly" in proc.stderr}


def compare_compile(args) -> dict:
    """Eager and compiled model.train side by side on the same data, tokenizer and config."""
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        tokenizer_dir = args.tokenizer_dir or bench_tokenizer(args.data_dir, args.vocab_size, tmp / "tokenizer")
        tokenizer_s = time.perf_counter() - t0
        cache = None if args.warm_inductor_cache else tmp / "inductor-cache"
        eager = train_run(args, tmp / "eager", tokenizer_dir, "off", cache)
        compiled = train_run(args, tmp / "compiled", tokenizer_dir, "on", cache)
    saved_s = (eager["ms_per_step"] - compiled["ms_per_step"]) / 1000
    extra_first_s = compiled["first_step_s"] - eager["first_step_s"]
    return {
        "device": args.device_type or "auto", "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "depth": args.depth, "max_seq_len": args.max_seq_len, "device_batch_size": args.device_batch_size,
        "total_batch_size": args.total_batch_size, "vocab_size": args.vocab_size, "steps": args.steps,
        "eager_ms_per_step": eager["ms_per_step"], "compiled_ms_per_step": compiled["ms_per_step"],
        "speedup": eager["ms_per_step"] / compiled["ms_per_step"],
        "eager_tok_per_sec": eager["tok_per_sec"], "compiled_tok_per_sec": compiled["tok_per_sec"],
        "eager_first_step_s": eager["first_step_s"], "compile_first_step_s": compiled["first_step_s"],
        "eager_val_bpb": eager["val_bpb"], "compiled_val_bpb": compiled["val_bpb"],
        "val_bpb_rel_diff": abs(compiled["val_bpb"] - eager["val_bpb"]) / eager["val_bpb"],
        "val_bpb_step0": eager["val_bpb_step0"], "lr_multiplier": args.lr_multiplier,
        "break_even_steps": extra_first_s / saved_s if saved_s > 0 else None,
        "inductor_cache": "warm (the user's)" if args.warm_inductor_cache else "cold (empty)",
        "eager_wall_s": eager["wall_s"], "compiled_wall_s": compiled["wall_s"],
        "compile_fallback": compiled["compile_fallback"], "tokenizer_s": tokenizer_s,
        "load_average_1m": os.getloadavg()[0],  # other processes on the machine skew CPU timings
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=None, help="default 12 (4 with --compare-compile)")
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=None, help="default 128 (64 with --compare-compile)")
    p.add_argument("--max-seq-len", type=int, default=None, help="default 2048 (256 with --compare-compile)")
    p.add_argument("--window-pattern", default=None, help="default SSSL (L with --compare-compile)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--device-batch-size", type=int, default=None, help="default 16 (8 with --compare-compile)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 60 with --compare-compile)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA only")
    p.add_argument("--fp8", action="store_true", help="time the FP8 model only")
    p.add_argument("--fp8-compare", action="store_true", help="CUDA: time bf16 and FP8 side by side")
    p.add_argument("--compare-compile", action="store_true",
                   help="run model.train eager and compiled on real data, side by side")
    p.add_argument("--total-batch-size", type=int, default=4096, help="--compare-compile: tokens per step")
    p.add_argument("--eval-tokens", type=int, default=65536, help="--compare-compile: val tokens at 0 and the end")
    p.add_argument("--data-dir", type=Path, default=SHARED_PRETRAIN, help="--compare-compile: shards (last = val)")
    p.add_argument("--tokenizer-dir", type=Path, default=None,
                   help="--compare-compile: a tokenizer directory (default: train one of --vocab-size)")
    p.add_argument("--device-type", default="", help="--compare-compile: cuda|cpu; empty = autodetect")
    p.add_argument("--warm-inductor-cache", action="store_true",
                   help="--compare-compile: use the user's inductor cache (default: an empty one, so "
                        "compile_first_step_s and break_even_steps count the whole compile)")
    p.add_argument("--lr-multiplier", type=float, default=SMALL_BATCH_LR_MULTIPLIER,
                   help="--compare-compile: x the reference LRs (default 8, as the smoke/cpu presets; 1 = reference)")
    args = p.parse_args()
    small = args.compare_compile
    for name, default, cpu_default in (("depth", 12, 4), ("head_dim", 128, 64), ("max_seq_len", 2048, 256),
                                       ("window_pattern", "SSSL", "L"), ("device_batch_size", 16, 8),
                                       ("steps", 20, 60)):
        if getattr(args, name) is None:
            setattr(args, name, cpu_default if small else default)
    if args.compare_compile:
        print(json.dumps(compare_compile(args), indent=2))
        return

    device = torch.device(autodetect_device_type())
    if device.type == "cpu":  # as model.train's compute_init does
        print(retain_freed_cpu_memory(), file=sys.stderr)
    if args.compile is None:
        args.compile = device.type == "cuda"
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")

    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
           "depth": args.depth, "max_seq_len": args.max_seq_len, "device_batch_size": args.device_batch_size,
           "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."), "compiled": args.compile,
           "torch": torch.__version__}
    if args.fp8_compare and device.type == "cuda":
        bf16, fp8 = time_steps(args, device, fp8=False), time_steps(args, device, fp8=True)
        out.update(bf16)
        out["fp8"] = fp8
        out["fp8_speedup"] = bf16["ms_per_step"] / fp8["ms_per_step"]
        out["fp8_mlp_gemm_speedup_d26"] = mlp_gemm_speedup(device)
    else:
        out.update(time_steps(args, device, fp8=args.fp8 and device.type == "cuda"))
        out["fp8"] = args.fp8 and device.type == "cuda"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
