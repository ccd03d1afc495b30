"""The logit softcap and a cross-entropy that uses the softcap's bound (docs/model.md#softcap-and-loss).

`softcap(z, cap)` is cap * tanh(z / cap), computed as 2 * cap * sigmoid(2z / cap) - cap: the same function
(tanh(u) = 2 sigmoid(2u) - 1), within ~1e-6 of the tanh form at cap 15. It is written this way for the CPU: torch's
vectorised tanh (Sleef's 1-ulp tanh) costs ~5x its sigmoid there, at vocab 32768 and d4 about 0.1 s of every
training step.

`bounded_cross_entropy(capped, targets, bound)` is F.cross_entropy for logits known to lie in [-bound, bound],
as softcapped logits do. The log-sum-exp then needs no max pass: exp(logit - bound) is at most 1 and at least
exp(-2 * bound), far from fp32's underflow at bound 15. Compiled, the loss becomes one pass over the logits
instead of three (max, exp-sum, target), and the softcap fuses into it. The results are the same sums in another
order: within a few fp32 ulps of F.cross_entropy (tests/test_softcap.py).

Both run in eager mode as well, where they save the same number of vocabulary-wide tensors for the backward as
the tanh + F.cross_entropy pair (two), and take less time on CPU.
"""

from __future__ import annotations

import torch


def softcap(z: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(z / cap), as 2 * cap * sigmoid(2z / cap) - cap; every value lies in [-cap, cap]."""
    return (2 * cap) * torch.sigmoid(z * (2 / cap)) - cap


def bounded_cross_entropy(capped: torch.Tensor, targets: torch.Tensor, bound: float, ignore_index: int = -1,
                          reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy(capped, targets, ignore_index=ignore_index, reduction=reduction) for N x V logits whose
    values all lie in [-bound, bound]. Positions whose target is `ignore_index` get loss 0 and no gradient;
    'mean' averages over the other positions (nan when there are none, as F.cross_entropy)."""
    check_reduction(reduction)
    log_sum_exp = torch.log(torch.exp(capped - bound).sum(-1)) + bound
    valid = targets != ignore_index
    target_logit = capped.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return reduce_losses(torch.where(valid, log_sum_exp - target_logit, 0.0), valid, reduction)


def check_reduction(reduction: str) -> None:
    """Refuse, by name, a reduction other than F.cross_entropy's 'mean', 'sum' or 'none'."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")


def reduce_losses(losses: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-position losses (0 where not `valid`) reduced as F.cross_entropy does: 'mean' over the valid positions
    (nan when there are none), 'sum', or 'none' (as they are)."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum()
