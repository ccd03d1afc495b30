"""The vocabulary projection's fp32 GEMMs on CPU through oneDNN instead of MKL (docs/model.md#cpu-lm-head).

On CPU, `F.linear` goes to MKL. For the lm_head (N = the vocabulary, K = the model width) oneDNN runs all three
GEMMs of a training step faster on the AMD EPYC (Zen 4) machines this project is tested on: at d4 shapes
(2048 x 256 x 32768, 2 threads) ~190 against ~250 ms each (`python -m bench.cpu_matmul`). For the model's
smaller layers oneDNN's grad_W is the slower one, so only the lm_head uses this. The results are the same fp32
products summed in another order.

`onednn_linear(x, weight)` is x @ weight.T for 2-D fp32 CPU tensors. With autograd it is a custom op, so
torch.compile keeps it whole (inductor's own lowering of the oneDNN op expects prepacked inference weights);
without (evaluation) it calls oneDNN directly, because a custom op's first call imports torch._dynamo, a second
of every evaluation process's start (tests/test_gpt.py::test_an_evaluation_process_never_imports_dynamo).
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
def _onednn_linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _onednn_mm_t(x, weight)


@_onednn_linear_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = _onednn_linear_op(grad, weight.t())  # grad @ weight
    grad_weight = _onednn_linear_op(x.t(), grad.t()).t()  # (x.T @ grad).T: oneDNN's fast layout for this shape
    return grad_x, grad_weight


_onednn_linear_op.register_autograd(_backward, setup_context=_setup_context)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T (x: M x K, weight: N x K, fp32 on CPU) through oneDNN, differentiable in both."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _onednn_linear_op(x, weight)
    return _onednn_mm_t(x, weight)
