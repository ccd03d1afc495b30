"""Benchmark: the lm_head's training loss on CPU, fused (model/head_loss.py) against the unfused path.

Times the forward and backward of projection + softcap + cross-entropy from the final hidden states (default d4's
2048 tokens x width 256 -> vocab 32768, as one micro-step), the fused autograd node against the model's unfused
path (the oneDNN projection, model/softcap.py's softcap and bounded cross-entropy), in eager mode and compiled.
The two run alternately in one process (after two warm-up calls each; the compile happens in the first), so a slow
spell of the machine hits both alike:

    python -m bench.head_loss                               # d4 at T=256, batch 8, vocab 32768
    python -m bench.head_loss --tokens 4096 --vocab 4096    # the cpu preset's micro-step

Prints JSON: for "eager" and "compiled", unfused_ms and fused_ms (medians of --repeats) and speedup (the median
of the paired ratios unfused / fused); then max_loss_rel_diff and max_grad_rel_diff between the two paths'
results (fp32 rounding, ~1e-7 of the largest value).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.timing import paired_times
from model.common import retain_freed_cpu_memory
from model.gpt import SOFTCAP
from model.head_loss import head_cross_entropy
from model.softcap import bounded_cross_entropy, softcap
from ops.cpu_matmul import onednn_linear


def unfused(hidden, weight, targets):
    return bounded_cross_entropy(softcap(onednn_linear(hidden, weight), SOFTCAP), targets, bound=SOFTCAP)


def fused(hidden, weight, targets):
    return head_cross_entropy(hidden, weight, targets, SOFTCAP)


def loss_and_grads(fn, hidden, weight, targets):
    """Loss and both gradients of one micro-step (the loss halved, as with two accumulation steps)."""
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(hidden, weight, targets) / 2
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def side_by_side(first, second, inputs, repeats: int) -> dict:
    first_s, second_s = paired_times(lambda: loss_and_grads(first, *inputs), lambda: loss_and_grads(second, *inputs),
                                     repeats)
    return {"unfused_ms": round(1e3 * statistics.median(first_s), 1),
            "fused_ms": round(1e3 * statistics.median(second_s), 1),
            "speedup": round(statistics.median(a / b for a, b in zip(first_s, second_s)), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="rows: device batch x sequence length")
    p.add_argument("--width", type=int, default=256, help="model width")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    retain_freed_cpu_memory()
    g = torch.Generator().manual_seed(0)
    hidden = torch.nn.functional.rms_norm(torch.randn(args.tokens, args.width, generator=g), (args.width,))
    weight = torch.randn(args.vocab, args.width, generator=g) * 0.05  # logits of a few units, as in training
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    targets[::16] = -1  # some ignored positions, as in SFT
    inputs = (hidden, weight, targets)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "shape": {"tokens": args.tokens, "width": args.width, "vocab": args.vocab}}
    out["eager"] = side_by_side(unfused, fused, inputs, args.repeats)
    out["compiled"] = side_by_side(torch.compile(unfused), torch.compile(fused), inputs, args.repeats)
    a, b = loss_and_grads(unfused, *inputs), loss_and_grads(fused, *inputs)
    out["max_loss_rel_diff"] = (a[0] - b[0]).abs().item() / a[0].abs().item()
    out["max_grad_rel_diff"] = max(((x - y).abs().max() / x.abs().max()).item() for x, y in zip(a[1:], b[1:]))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
