"""Benchmark: the training loss over the logits, tanh softcap + F.cross_entropy against model/softcap.py's forms.

Times the forward and backward of the loss alone over B·T x vocab fp32 logits (default d4's 2048 x 32768), in
eager mode and compiled, both ways, side by side in one process, and checks that they agree:

    python -m bench.softcap_loss                            # d4 at T=256, batch 8, vocab 32768
    python -m bench.softcap_loss --tokens 4096 --vocab 4096 # the cpu preset's micro-step

Prints JSON: for "eager" and "compiled", torch_ms and softcap_ms (medians of --repeats) and speedup; then
max_loss_diff and max_grad_rel_diff between the two (fp32 rounding, ~1e-7).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from model.common import retain_freed_cpu_memory
from model.gpt import SOFTCAP
from model.softcap import bounded_cross_entropy, softcap


def torch_loss(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(SOFTCAP * torch.tanh(z / SOFTCAP), targets, ignore_index=-1)


def softcap_loss(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return bounded_cross_entropy(softcap(z, SOFTCAP), targets, bound=SOFTCAP, ignore_index=-1)


def loss_and_grad(fn, z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().requires_grad_()
    loss = fn(z, targets)
    loss.backward()
    return loss.detach(), z.grad


def median_ms(fn, z, targets, repeats: int) -> float:
    loss_and_grad(fn, z, targets)  # warm-up (and the compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss_and_grad(fn, z, targets)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="rows: device batch x sequence length")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    retain_freed_cpu_memory()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.tokens, args.vocab, generator=g) * 4  # raw logits; some beyond the cap
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    targets[: args.tokens // 64] = -1  # some ignored positions, as in SFT
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "shape": {"tokens": args.tokens, "vocab": args.vocab}}
    worst_loss, worst_grad = 0.0, 0.0
    for mode in ("eager", "compiled"):
        reference, ours = torch_loss, softcap_loss
        if mode == "compiled":
            reference, ours = torch.compile(reference, dynamic=False), torch.compile(ours, dynamic=False)
        torch_ms, softcap_ms = median_ms(reference, z, targets, args.repeats), median_ms(ours, z, targets, args.repeats)
        out[mode] = {"torch_ms": round(torch_ms, 1), "softcap_ms": round(softcap_ms, 1),
                     "speedup": round(torch_ms / softcap_ms, 3)}
        (l1, g1), (l2, g2) = loss_and_grad(reference, z, targets), loss_and_grad(ours, z, targets)
        worst_loss = max(worst_loss, (l1 - l2).abs().item())
        worst_grad = max(worst_grad, ((g1 - g2).abs().max() / g1.abs().max()).item())
    out["max_loss_diff"], out["max_grad_rel_diff"] = worst_loss, worst_grad
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
