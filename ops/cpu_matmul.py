"""The model's fp32 GEMMs on CPU through oneDNN instead of MKL, where that is faster (docs/model.md#cpu-linear-layers).

On CPU, `F.linear` goes to MKL, which picks its kernels by CPU vendor; oneDNN (in the same torch build) picks them by
instruction set, and on the AMD EPYC (Zen 4) machines this project is tested on it is the faster of the two for
most of a training step's GEMMs (`python -m bench.cpu_matmul`, 2 threads, d4 at T=256, batch 8):
- the lm_head (2048 x 256 x 32768): all three GEMMs, ~190 against ~250-360 ms each;
- the blocks' layers (256 <-> 256, 768, 1024 wide): the forward and grad_x, 20-40% faster; grad_W is not (MKL is
  ~10% ahead there), so `onednn_grad_weight=False` leaves it to torch's mm.
The results are the same fp32 products summed in another order.

`onednn_linear(x, weight, onednn_grad_weight=True)` is x @ weight.T for 2-D fp32 CPU tensors. With autograd it is
a custom op, so torch.compile keeps it whole (inductor's own lowering of the oneDNN op expects prepacked
inference weights); without (evaluation) it calls oneDNN directly, because a custom op's first call imports
torch._dynamo, a second of every evaluation process's start
(tests/test_gpt.py::test_an_evaluation_process_never_imports_dynamo).
"""

from __future__ import annotations

import torch

# Read once: torch.compile cannot trace torch.backends.mkldnn.is_available() (dynamo skips torch.backends), so a
# call in the forward split the compiled model in two at the lm_head, and the softcap and the loss into separate
# kernels with the logits written and read in between.
ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available()


def onednn_linear_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether onednn_linear can take these: fp32 CPU tensors, on a torch built with oneDNN."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and ONEDNN_AVAILABLE)


def _onednn_mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T through oneDNN's linear (a: M x K, b: N x K, either may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


# Defined at import: torch.compile cannot define it while tracing. Defining it does not import torch._dynamo.
@torch.library.custom_op("speedrun::onednn_linear", mutates_args=())
def _onednn_linear_op(x: torch.Tensor, weight: torch.Tensor, onednn_grad_weight: bool) -> torch.Tensor:
    return _onednn_mm_t(x, weight)


@_onednn_linear_op.register_fake
def _(x, weight, onednn_grad_weight):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, ctx.onednn_grad_weight = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    # the op itself, not _onednn_mm_t: compiled, the backward is traced too, and inductor's lowering of oneDNN's
    # linear fails on these operands
    grad_x = _onednn_linear_op(grad, weight.t(), False)  # grad @ weight
    if ctx.onednn_grad_weight:
        grad_weight = _onednn_linear_op(x.t(), grad.t(), False).t()  # (x.T @ grad).T: oneDNN's fast layout here
    else:
        grad_weight = grad.t() @ x
    return grad_x, grad_weight, None


_onednn_linear_op.register_autograd(_backward, setup_context=_setup_context)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, onednn_grad_weight: bool = True) -> torch.Tensor:
    """x @ weight.T (x: M x K, weight: N x K, fp32 on CPU) through oneDNN, differentiable in both. The weight's
    gradient goes through oneDNN too with `onednn_grad_weight`, else through torch's mm (MKL), which is the
    faster of the two unless N is large (the vocabulary: ~190 against ~360 ms at d4; a 256- or 1024-wide
    layer: within ~10% either way, MKL mostly ahead)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _onednn_linear_op(x, weight, onednn_grad_weight)
    return _onednn_mm_t(x, weight)
