"""Benchmark: training-step throughput of the GPT at a given depth on the current device.

Times full training steps (forward, backward, MuonAdamW step) on random tokens after a warm-up, in one
process: no shards, tokenizer or Prefect needed, so it runs anywhere `model/` runs (e.g. a GPU box with
`PYTHONPATH=.`).

    python -m bench.train_throughput --depth 12                       # CPU or GPU, prints JSON
    python -m bench.train_throughput --depth 12 --fp8-compare          # CUDA: bf16 vs FP8 steps, same run
    python -m bench.train_throughput --depth 4 --max-seq-len 256 --device-batch-size 8   # CPU-sized

Keys: device, depth, tok_per_sec, ms_per_step (medians), and on CUDA mfu (bf16 dense peak, as the reference)
and, with --fp8-compare, fp8_speedup (bf16 ms / fp8 ms for the model) and fp8_mlp_gemm_speedup_d26
(fwd+bwd of the d26 MLP GEMM 65536x1664 @ 1664x6656, the reference's microbenchmark).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from model.common import COMPUTE_DTYPE, autodetect_device_type, get_peak_flops
from model.gpt import GPT, GPTConfig
from model.sizing import ModelShape


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device, fp8: bool):
    shape = ModelShape.from_depth(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                                  vocab_size=args.vocab_size, seq_len=args.max_seq_len, window_pattern=args.window_pattern)
    config = GPTConfig(sequence_len=args.max_seq_len, vocab_size=args.vocab_size, n_layer=args.depth,
                       n_head=shape.n_head, n_kv_head=shape.n_head, n_embd=shape.model_dim,
                       window_pattern=args.window_pattern)
    torch.manual_seed(42)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if fp8:
        from kernels.fp8 import convert_to_float8_training

        convert_to_float8_training(model)
    optimizer = model.setup_optimizer()
    compiled = torch.compile(model, dynamic=False) if args.compile else model
    return model, compiled, optimizer


def time_steps(args, device, fp8: bool) -> dict:
    model, compiled, optimizer = build(args, device, fp8)
    B, T = args.device_batch_size, args.max_seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = compiled(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
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
    """bf16 vs FP8 fwd+bwd of the d26 MLP up-projection GEMM, both compiled (spec/06 A.4)."""
    import torch.nn as nn
    from kernels.fp8 import Float8Linear

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", default="SSSL")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA only")
    p.add_argument("--fp8", action="store_true", help="time the FP8 model only")
    p.add_argument("--fp8-compare", action="store_true", help="CUDA: time bf16 and FP8 side by side")
    args = p.parse_args()
    device = torch.device(autodetect_device_type())
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
