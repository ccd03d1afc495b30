"""The training loss of the lm_head on CPU as one autograd node: projection, softcap and cross-entropy, with the
logits' gradient computed in the forward (docs/model.md#fused-head-loss).

`head_cross_entropy(hidden, weight, targets, cap)` equals
`bounded_cross_entropy(softcap(hidden @ weight.T, cap), targets, bound=cap)` (model/softcap.py), loss and
gradients, within fp32 rounding. The loss's gradient with respect to the raw logits z is known in the forward,
up to the upstream factor: for row i with target t_i and weight w_i (0 for an ignored row; 1 / #valid for
'mean'),

    d loss / d z_ij = w_i * (softmax(c_i)_j - [j == t_i]) * 4 s_ij (1 - s_ij),    s = sigmoid(2z / cap),
                                                                                   c = 2 cap s - cap = softcap(z)

so the forward computes it while the logits are at hand, saves it instead of the capped logits (the same
B*T x vocab floats), and the backward is the projection's two GEMMs, scaled by the upstream gradient
(a scalar for 'mean' and 'sum', so it scales the small results, not the logits). Compiled, the node's forward is
one kernel over the logits and its backward has none. Unfused, inductor runs the loss's forward and backward
as separate kernels that write and read the logits several times, and zero-fills a logits-sized tensor for the
target term's scatter. It is used for fp32 training on CPU, where the GEMMs go through ops/cpu_matmul.py
(GPT.forward; `python -m bench.head_loss` times it against the unfused path).
"""

from __future__ import annotations

import torch

from model.softcap import check_reduction, reduce_losses
from ops.cpu_matmul import linear_grads, onednn_linear


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, cap: float, ignore_index: int, reduction: str):
        # In-place ops on fresh temporaries: eagerly, each pass reuses its buffer instead of allocating another
        # logits-sized one; compiled, they are the same pure functions.
        z = onednn_linear(hidden, weight)
        s = torch.sigmoid(z.mul_(2 / cap))  # softcap(z) = 2 cap s - cap (model.softcap.softcap)

        def scaled_exps():  # exp(softcap(z) - cap) in [e^(-2 cap), 1]: no max pass (softcap.bounded_cross_entropy)
            return s.mul(2 * cap).sub_(2 * cap).exp_()

        total = scaled_exps().sum(-1, keepdim=True)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0).unsqueeze(-1)
        target_s = s.gather(-1, safe_targets)
        target_logit = ((2 * cap) * target_s - cap).squeeze(-1)
        losses = torch.where(valid, torch.log(total).squeeze(-1) + cap - target_logit, 0.0)

        row_weight = valid.to(z.dtype)  # d(reduced loss) / d losses_i
        if reduction == "mean":  # clamped: with every row ignored the loss is nan (as F.cross_entropy), the gradient 0
            row_weight = row_weight / valid.sum().clamp(min=1)
        row_weight = row_weight.unsqueeze(-1)
        # softmax times d softcap / dz = 4 s (1 - s), minus that slope at the target. The exponentials are computed
        # again rather than kept: compiled, a second exp costs less than writing and reading another logits-sized
        # tensor (inductor then runs the row sums and this product as passes over s alone).
        grad_logits = scaled_exps().mul_(row_weight / total).mul_(torch.sub(1, s).mul_(s).mul_(4))
        grad_logits.scatter_add_(-1, safe_targets, -row_weight * (4 * target_s) * (1 - target_s))
        ctx.save_for_backward(hidden, weight, grad_logits)
        ctx.reduction = reduction
        return reduce_losses(losses, valid, reduction)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, grad_logits = ctx.saved_tensors
        if ctx.reduction == "none":  # one upstream factor per row
            grad_hidden, grad_weight = linear_grads(hidden, weight, grad_logits * grad.unsqueeze(-1))
        else:
            grad_hidden, grad_weight = linear_grads(hidden, weight, grad_logits)
            grad_hidden, grad_weight = grad_hidden * grad, grad_weight * grad
        return grad_hidden, grad_weight, None, None, None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                       ignore_index: int = -1, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of softcap(hidden @ weight.T, cap) against targets (hidden: N x C, weight: V x C, targets: N;
    fp32 on CPU): F.cross_entropy's value and gradients with ignore_index and reduction 'mean', 'sum' or 'none'."""
    check_reduction(reduction)
    return _HeadCrossEntropy.apply(hidden, weight, targets, cap, ignore_index, reduction)
