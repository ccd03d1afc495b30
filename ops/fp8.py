"""FP8 training for linear layers: tensorwise dynamic scaling on top of ``torch._scaled_mm`` (docs/model.md#fp8).

A minimal re-implementation of the "tensorwise" recipe: every call quantises each operand with one
scale per tensor, recomputed from its current absolute maximum, and runs all three GEMMs of a
linear layer in FP8:

    forward   y      = x · Wᵀ        x: e4m3,  W: e4m3   fast accumulation on (CUDA)
    backward  grad_x = grad_y · W    grad_y: e5m2, W: e4m3   fast accumulation off
              grad_W = grad_yᵀ · x   grad_y: e5m2, x: e4m3   fast accumulation off

(H100 cuBLAS has no e5m2 x e5m2 GEMM, so gradients always meet an e4m3 operand; CPU uses the same
pairings so that CPU tests exercise the CUDA math.) The forward saves the *quantised* input and
weight with their inverse scales, so activations are kept in FP8 between forward and backward.

Module-level API:

- ``tensorwise_scale`` / ``quantize_tensorwise``: the scaling rule, as pure functions.
- ``Float8Linear``: an ``nn.Linear`` subclass whose forward runs the FP8 matmul; built with
  ``Float8Linear.from_linear`` sharing the original weight/bias Parameters (state_dict keys and
  optimizer references are unchanged).
- ``fp8_module_filter``, ``convert_to_float8_training``: choose and swap eligible layers in place.
- ``disable_fp8(model)``: context manager that temporarily swaps every FP8 layer back to its
  original linear class (for evaluation in bf16), restoring on exit.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
import torch.nn as nn

__all__ = [
    "FP8_E4M3_MAX",
    "FP8_E5M2_MAX",
    "Float8Linear",
    "convert_to_float8_training",
    "disable_fp8",
    "fp8_module_filter",
    "fp8_matmul",
    "quantize_tensorwise",
    "tensorwise_scale",
]

FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8_E5M2_MAX = 57344.0  # torch.finfo(torch.float8_e5m2).max
AMAX_EPS = 1e-12

_FMAX = {torch.float8_e4m3fn: FP8_E4M3_MAX, torch.float8_e5m2: FP8_E5M2_MAX}


# ---------------------------------------------------------------------------------------------
# scaling
# ---------------------------------------------------------------------------------------------

def tensorwise_scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """float32(fmax / max(float64(amax), 1e-12)): the division runs in float64 so eager and
    compiled code agree bit for bit; the floor keeps an all-zero tensor finite."""
    denom = torch.clamp(amax.to(torch.float64), min=AMAX_EPS)
    return (fmax / denom).to(torch.float32)


def quantize_tensorwise(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``t`` to the FP8 ``dtype`` with one dynamic scale.

    Returns ``(t8, inv_scale)`` with ``t ≈ t8.float() * inv_scale``; ``inv_scale`` is a 0-dim
    float32 tensor (the form ``torch._scaled_mm`` takes). Values are saturated to ±fmax before
    the cast, so nothing overflows to NaN/inf.
    """
    if dtype not in _FMAX:
        raise ValueError(f"unsupported FP8 dtype {dtype}; use torch.float8_e4m3fn or torch.float8_e5m2")
    fmax = _FMAX[dtype]
    amax = t.detach().abs().amax().to(torch.float32)
    scale = tensorwise_scale(amax, fmax)
    t8 = (t.to(torch.float32) * scale).clamp(-fmax, fmax).to(dtype)
    return t8, scale.reciprocal()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """Same values, column-major memory (transpose-copy-transpose); no copy if already so."""
    return t if t.stride(0) == 1 else t.t().contiguous().t()


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


# ---------------------------------------------------------------------------------------------
# the FP8 matmul as one autograd Function (opaque to torch.compile)
# ---------------------------------------------------------------------------------------------

class _Float8Matmul(torch.autograd.Function):
    """y = x · Wᵀ for 2-D x (M x K) and W (N x K), all three GEMMs in FP8 via ``torch._scaled_mm``.

    ``_scaled_mm(a, b)`` wants ``a`` row-major and ``b`` column-major (cuBLAS; the CPU kernel
    accepts any layout but gets the same ones here).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x8, x_inv = quantize_tensorwise(x, torch.float8_e4m3fn)
        w8, w_inv = quantize_tensorwise(weight, torch.float8_e4m3fn)
        x8 = _row_major(x8)
        # w8 is N x K row-major, so its transpose view is K x N column-major: what _scaled_mm wants.
        y = torch._scaled_mm(
            x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype, use_fast_accum=x.is_cuda,
        )
        ctx.save_for_backward(x8, w8, x_inv, w_inv)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x8, w8, x_inv, w_inv = ctx.saved_tensors
        g8, g_inv = quantize_tensorwise(grad_y, torch.float8_e5m2)
        g8 = _row_major(g8)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # (M x N) · (N x K): W as the column-major second operand.
            grad_x = torch._scaled_mm(
                g8, _col_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=grad_y.dtype, use_fast_accum=False,
            )
        if ctx.needs_input_grad[1]:
            # (N x M) · (M x K): grad_yᵀ copied row-major, the saved input made column-major.
            grad_w = torch._scaled_mm(
                g8.t().contiguous(), _col_major(x8), scale_a=g_inv, scale_b=x_inv,
                out_dtype=grad_y.dtype, use_fast_accum=False,
            ).to(ctx.weight_dtype)
        return grad_x, grad_w


@functools.cache
def _allow_fp8_matmul_in_graph() -> None:
    """Make torch.compile fuse the code around the FP8 matmul without tracing inside it.

    Done when the first Float8Linear is built, not at import: it imports torch._dynamo (~1 s), which a process
    that only imports this module (every evaluation does, for disable_fp8) should not pay."""
    torch._dynamo.allow_in_graph(_Float8Matmul)  # registers the class itself (returns it unchanged)


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FP8 ``x · weightᵀ`` for 2-D x; differentiable in both arguments; output dtype = x.dtype."""
    return _Float8Matmul.apply(x, weight)


# ---------------------------------------------------------------------------------------------
# module
# ---------------------------------------------------------------------------------------------

class Float8Linear(nn.Linear):
    """Linear layer computing ``x · Wᵀ (+ b)`` with tensorwise-scaled FP8 GEMMs.

    The fp32 master weight is quantised directly each call. The input is used in its own dtype
    (or the autocast dtype when autocast is on); the output has that dtype, and the optional bias
    is added in it.
    """

    _orig_class: type = nn.Linear

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _allow_fp8_matmul_in_graph()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        lead = x.shape[:-1]
        y = fp8_matmul(x.reshape(-1, self.in_features), self.weight)
        y = y.reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float8Linear":
        """A Float8Linear sharing ``linear``'s weight and bias Parameter objects.

        The shell is created on the meta device, so no memory is allocated; the original class is
        remembered so ``disable_fp8`` can swap back.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        new._orig_class = type(linear)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=tensorwise, orig={self._orig_class.__name__}"


def _to_original(module: Float8Linear) -> nn.Linear:
    """An instance of ``module``'s original linear class sharing its Parameters.

    The original constructor's signature is unknown (the model's own ``Linear`` takes no ``bias``
    argument), so the instance is made without calling ``__init__``: a shallow copy of the
    module's state with fresh containers holding the same Parameter objects. No tensor is created.
    """
    cls = module._orig_class
    plain = cls.__new__(cls)
    state = {k: v for k, v in module.__dict__.items() if k != "_orig_class"}
    for k, v in state.items():
        if isinstance(v, dict):
            state[k] = type(v)(v)
    plain.__dict__.update(state)
    return plain


# ---------------------------------------------------------------------------------------------
# model conversion
# ---------------------------------------------------------------------------------------------

def fp8_module_filter(module: nn.Module, fqn: str) -> bool:
    """True for linear layers FP8 tensor cores can run: both dims multiples of 16, min dim >= 128."""
    if not isinstance(module, nn.Linear) or isinstance(module, Float8Linear):
        return False
    fin, fout = module.in_features, module.out_features
    return fin % 16 == 0 and fout % 16 == 0 and min(fin, fout) >= 128


def convert_to_float8_training(
    module: nn.Module,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = fp8_module_filter,
) -> int:
    """Replace, in place, every linear layer under ``module`` that passes the filter by a
    Float8Linear sharing its Parameters (post-order walk). Returns the number converted.

    ``module`` itself is not replaced (convert its parent if it is a bare linear layer).
    """
    count = 0

    def walk(parent: nn.Module, prefix: str) -> None:
        nonlocal count
        for name, child in list(parent.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            walk(child, fqn)
            if not isinstance(child, nn.Linear) or isinstance(child, Float8Linear):
                continue
            if module_filter_fn is not None and not module_filter_fn(child, fqn):
                continue
            setattr(parent, name, Float8Linear.from_linear(child))
            count += 1

    walk(module, "")
    return count


@contextlib.contextmanager
def disable_fp8(model: nn.Module):
    """Temporarily swap every Float8Linear under ``model`` back to its original linear class
    (sharing the same weight), e.g. to evaluate in bf16; the very same Float8Linear objects are
    put back on exit, also when the body raises."""
    swapped: list[tuple[nn.Module, str, Float8Linear]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Float8Linear):
                swapped.append((parent, name, child))
    try:
        for parent, name, child in swapped:
            setattr(parent, name, _to_original(child))
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
