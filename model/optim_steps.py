"""The update math of MuonAdamW (model/optim.py) for one parameter or one stack of same-shape matrices.

Docs: docs/model.md#adamw, docs/model.md#muon. AdamW works in fp32 (decoupled weight decay before the
update, bias corrections) and writes results back in the storage dtype of parameter and state. Muon works
on the stack (K x r x c) of a group's same-shape matrices: Nesterov momentum, optional bf16 cast, MuonEq
row equilibration, Polar Express orthogonalisation, Muon+ renormalisation, NorMuon variance reduction and
cautious weight decay with the tall-matrix learning-rate boost. Hyper-parameters arrive as 0-D CPU tensors
so that schedule changes never recompile. `StepFunction` compiles a step function with
`torch.compile(fullgraph=True, dynamic=False)` when asked and, where compiling fails (no C++ compiler for
inductor on CPU, an unsupported Python), says why once and runs the same function eagerly.
"""

from __future__ import annotations

import math
import warnings

import torch

# Polar Express coefficients (a, b, c) per iteration (Amsel et al., arXiv 2505.16932;
# num_iters=5, safety 2e-2, cushion 2).
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


# ----------------------------------------------------------------------------------------------
# Step functions (pure tensor code; compiled or eager, see StepFunction)


def adamw_step_fused(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t) -> None:
    """One AdamW update of `p` (docs/model.md#adamw), in place. Arithmetic in fp32, results stored in the
    dtypes of `p`, `exp_avg`, `exp_avg_sq`. `step_t` is the step number after incrementing (>= 1)."""
    pf = p.float()
    g = grad.float()
    m = exp_avg.float()
    v = exp_avg_sq.float()
    pf = pf * (1 - lr_t * wd_t)
    m = m + (1 - beta1_t) * (g - m)
    v = v + (1 - beta2_t) * (g * g - v)
    bias1 = 1 - beta1_t**step_t
    bias2 = 1 - beta2_t**step_t
    pf = pf - (lr_t / bias1) * m / (torch.sqrt(v / bias2) + eps_t)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    p.copy_(pf)


def muon_lr_scale(rows: int, cols: int) -> float:
    """Muon's shape-dependent LR factor: sqrt(max(1, r/c)) (2.0 for a 4C x C matrix)."""
    return math.sqrt(max(1.0, rows / cols))


def muon_reduction_dim(rows: int, cols: int) -> int:
    """NorMuon reduces over columns (per-row statistics) when r >= c, else over rows."""
    return -1 if rows >= cols else -2


def muon_equilibrate(u: torch.Tensor) -> torch.Tensor:
    """MuonEq: rescale every row of every matrix to the same L2 norm ||U||_F / sqrt(r).
    Norms are computed in fp32; the result keeps the dtype of `u`."""
    uf = u.float()
    rows = u.size(-2)
    target = uf.norm(dim=(-2, -1), keepdim=True) / math.sqrt(rows)
    row_norm = uf.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return u * (target / row_norm).to(u.dtype)


def polar_express(u: torch.Tensor, ns_steps: int) -> torch.Tensor:
    """Normalise (||U||_F * 1.01 + 1e-6) then run `ns_steps` Polar Express iterations on a stack of
    matrices (K x r x c); returns an approximately semi-orthogonal stack in the dtype of `u`."""
    x = u / (u.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    wide = u.size(-2) <= u.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if wide:
            gram = x @ x.mT
            poly = b * gram + c * (gram @ gram)
            x = a * x + poly @ x
        else:
            gram = x.mT @ x
            poly = b * gram + c * (gram @ gram)
            x = a * x + x @ poly
    return x


def normuon(o: torch.Tensor, second_moment: torch.Tensor, beta2_t, red_dim: int) -> torch.Tensor:
    """NorMuon variance reduction (arXiv 2510.05491). Updates `second_moment` (K x r x 1 when
    red_dim == -1, K x 1 x c when red_dim == -2) in place and returns O rescaled per row/column
    with its Frobenius norm preserved (computed in fp32, returned in the dtype of `o`)."""
    of = o.float()
    n = o.size(red_dim)
    q = of.square().mean(dim=red_dim, keepdim=True)
    norm0 = (q * n).sum(dim=(-2, -1), keepdim=True).sqrt()
    s_buf = second_moment.float()
    s_buf = s_buf + (1 - beta2_t) * (q - s_buf)
    second_moment.copy_(s_buf)
    scale = torch.rsqrt(s_buf.clamp_min(1e-10))
    norm1 = (q * n * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return (of * (scale * norm0 / norm1.clamp_min(1e-10))).to(o.dtype)


def muon_step_fused(
    grads, params, momentum_buf, second_buf, momentum_t, lr_t, wd_t, beta2_t, ns_steps: int, use_bf16: bool
) -> None:
    """One Muon update (docs/model.md#muon) of a stack `params` (K x r x c), in place.
    `momentum_buf` (K x r x c) and `second_buf` (K x r x 1 or K x 1 x c) are updated in place."""
    rows, cols = params.size(-2), params.size(-1)
    # 1. Nesterov momentum (lerp form)
    g = grads.float()
    m = momentum_buf.float()
    m = m + (1 - momentum_t) * (g - m)
    momentum_buf.copy_(m)
    u = g + momentum_t * (m - g)
    # 2. optional bf16 compute
    if use_bf16:
        u = u.to(torch.bfloat16)
    # 3. MuonEq, 4.-5. normalise + Polar Express, 6. back to the parameter dtype
    u = muon_equilibrate(u)
    o = polar_express(u, ns_steps).to(params.dtype)
    # 7. Muon+ renormalisation to sqrt(min(r, c))
    o = o * (math.sqrt(min(rows, cols)) / o.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    # 8. NorMuon
    o = normuon(o, second_buf, beta2_t, muon_reduction_dim(rows, cols))
    # 9. cautious weight decay + update with the tall-matrix LR boost
    lr_eff = lr_t * muon_lr_scale(rows, cols)
    of = o.float()
    pf = params.float()
    mask = (of * pf) >= 0
    pf = pf - lr_eff * of - (lr_eff * wd_t) * pf * mask
    params.copy_(pf)


def _raise_recompile_limit() -> None:
    # One graph per distinct (shape, dtype) of the inputs: a GPT has ~8 AdamW shapes plus its Muon
    # shapes, more than dynamo's default limit of 8 recompiles per function, so raise it.
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this function cannot be compiled here", raised before anything runs."""
    import torch._dynamo.exc as dynamo_exc

    errors = [dynamo_exc.BackendCompilerFailed, dynamo_exc.Unsupported]
    try:
        from torch._inductor.exc import InductorError, InvalidCxxCompiler

        errors += [InductorError, InvalidCxxCompiler]
    except ImportError:  # older torch: these surface as BackendCompilerFailed
        pass
    return tuple(errors)


class StepFunction:
    """A step function, compiled on first use when asked; eager (with one warning saying why) when
    compiling is impossible here. Compile errors are raised before the graph runs, so falling back never
    applies an update twice."""

    def __init__(self, fn, compile: bool):
        self.fn = fn
        self.compiled = None
        self.fallback_reason: str | None = None
        if compile:
            if not hasattr(torch, "compile"):
                self.fallback_reason = "this torch has no torch.compile"
            else:
                _raise_recompile_limit()
                self.compiled = torch.compile(fn, fullgraph=True, dynamic=False)

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args):
        if self.compiled is None:
            return self.fn(*args)
        try:
            return self.compiled(*args)
        except _compile_errors() as exc:
            self.compiled = None
            self.fallback_reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            warnings.warn(f"MuonAdamW: torch.compile of {self.fn.__name__} failed, running it eagerly "
                          f"({self.fallback_reason})", RuntimeWarning, stacklevel=2)
            return self.fn(*args)
