"""Benchmark: a linear layer's three fp32 GEMMs on CPU, MKL (torch's default) against oneDNN (ops/cpu_matmul.py).

    python -m bench.cpu_matmul                              # d4's lm_head: 2048 tokens, width 256, vocab 32768
    python -m bench.cpu_matmul --vocab 1024                 # a d4 block's MLP input layer (256 -> 1024)
    python -m bench.cpu_matmul --tokens 4096 --width 512    # other shapes

Times the forward (x @ W.T), grad_x (g @ W) and grad_W (g.T @ x) both ways in one process, the two libraries'
calls alternating (after two warm-up calls each), so that a slow spell of the machine hits both alike. Prints one
JSON: per GEMM `mkl_ms` and `onednn_ms` (medians of --repeats calls) and `speedup` (the median of the paired
ratios mkl / onednn); `total_speedup`; `grad_x_in_training` (the library the model's backward uses for this
layer's grad_x on this CPU: ops.cpu_matmul.grad_input_on_onednn); and `max_rel_diff` (the largest difference
between the two results, relative to the largest magnitude; fp32 rounding, ~1e-6). oneDNN's grad_x takes W.T as
the model's backward would pass it (ops.cpu_matmul.grad_input_operand: a contiguous copy for wide layers, timed
with the copy). Freed memory is kept for reuse as in training (model.common.retain_freed_cpu_memory), so neither
side pays page faults for its output.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.timing import paired_times
from model.common import retain_freed_cpu_memory
from ops.cpu_matmul import grad_input_on_onednn, grad_input_operand, onednn_linear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="rows of x: device batch x sequence length")
    p.add_argument("--width", type=int, default=256, help="model width (K)")
    p.add_argument("--vocab", type=int, default=32768, help="padded vocabulary (N)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    retain_freed_cpu_memory()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.width, generator=g)
    w = torch.randn(args.vocab, args.width, generator=g) * 0.02
    grad = torch.randn(args.tokens, args.vocab, generator=g) * 1e-3
    gemms = {  # name: (MKL, oneDNN), the same product
        "forward": (lambda: x @ w.t(), lambda: onednn_linear(x, w)),
        "grad_x": (lambda: grad @ w, lambda: onednn_linear(grad, grad_input_operand(w))),
        "grad_w": (lambda: grad.t() @ x, lambda: onednn_linear(x.t(), grad.t()).t()),
    }
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "shape": {"tokens": args.tokens, "width": args.width, "vocab": args.vocab}}
    worst, total_mkl_ms, total_onednn_ms = 0.0, 0.0, 0.0
    with torch.no_grad():
        for name, (mkl, onednn) in gemms.items():
            mkl_s, onednn_s = paired_times(mkl, onednn, args.repeats)
            mkl_ms, onednn_ms = statistics.median(mkl_s) * 1e3, statistics.median(onednn_s) * 1e3
            total_mkl_ms, total_onednn_ms = total_mkl_ms + mkl_ms, total_onednn_ms + onednn_ms
            a, b = mkl(), onednn()
            worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
            out[name] = {"mkl_ms": round(mkl_ms, 1), "onednn_ms": round(onednn_ms, 1),
                         "speedup": round(statistics.median(m / o for m, o in zip(mkl_s, onednn_s)), 3)}
    out["total_speedup"] = round(total_mkl_ms / total_onednn_ms, 3)  # from the unrounded medians
    out["grad_x_in_training"] = "onednn" if grad_input_on_onednn(w) else "mkl"
    out["max_rel_diff"] = worst
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
