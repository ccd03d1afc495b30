"""The model's fp32 GEMMs on CPU through oneDNN instead of MKL, where that is faster (docs/model.md#cpu-linear-layers).

On CPU, `F.linear` goes to MKL, which picks its kernels by CPU vendor (on AMD, its AVX2 ones); oneDNN (in the same
torch build) picks them by instruction set. On the 2-core AMD EPYC machines this project is tested on, oneDNN is
the faster of the two for most of a training step's GEMMs (`python -m bench.cpu_matmul`, 2 threads, d4 at T=256,
batch 8):
- the lm_head (2048 x 256 x 32768): the forward and grad_W everywhere measured; grad_x against a contiguous
  copy of W^T only where oneDNN has AVX-512 kernels (Zen 4: 195 against MKL's 214-225 ms). With AVX2 only
  (Zen 3) MKL's grad_x is the faster (1.12x), so the backward leaves it to torch's mm there
  (WIDE_GRAD_INPUT_ON_ONEDNN);
- the blocks' layers (256 <-> 256, 768, 1024 wide): the forward and grad_x (against the transposed view), 1-40%
  faster; grad_W is not (MKL is ~10% ahead there), so below WIDE_OUTPUT output features the backward leaves grad_W
  to torch's mm.
The results are the same fp32 products summed in another order.

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

# Output features from which oneDNN's grad_W and grad_x against a contiguous W^T are the faster choices (paired
# medians, 2 threads, K = 256: grad_W 1.07x at 2048, 1.21x at 4096, 1.17x at 8192, even at 1024; grad_x 1.04x at
# 4096, 0.93-0.97x at 256 - 1024): the vocabulary-wide lm_head, not the blocks' layers at CPU sizes.
WIDE_OUTPUT = 4096

# Whether a wide layer's grad_x runs on oneDNN: only with its AVX-512 kernels (measured on Zen 4). On an AVX2-only
# CPU (Zen 3) oneDNN's grad_x at vocabulary widths is 4-12% behind MKL's (paired medians, 2 threads, 2048 x 32768 @
# 32768 x 256: MKL 293, oneDNN 307 against the view, 328 with the contiguous copy), where the narrow layers' grad_x
# is still 1.01-1.20x faster on oneDNN. Read once, like ONEDNN_AVAILABLE.
WIDE_GRAD_INPUT_ON_ONEDNN = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def onednn_linear_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether onednn_linear can take these: fp32 CPU tensors, on a torch built with oneDNN."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and ONEDNN_AVAILABLE)


def grad_input_on_onednn(weight: torch.Tensor) -> bool:
    """Whether the backward computes grad_x = grad @ W through oneDNN (else torch's mm): below WIDE_OUTPUT output
    features always, from it where oneDNN has AVX-512 kernels."""
    return weight.size(0) < WIDE_OUTPUT or WIDE_GRAD_INPUT_ON_ONEDNN


def grad_input_operand(weight: torch.Tensor) -> torch.Tensor:
    """W^T as grad_x = grad @ W passes it to oneDNN: a contiguous copy from WIDE_OUTPUT output features, else the
    transposed view."""
    return weight.t().contiguous() if weight.size(0) >= WIDE_OUTPUT else weight.t()


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


def linear_grads(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad @ weight, grad.T @ x): the gradients of x @ weight.T for the upstream `grad`, each GEMM on the library
    chosen above for the layer's width and this CPU. Autograd code only (it calls the custom op)."""
    # the op itself, not _onednn_mm_t: compiled, the backward is traced too, and inductor's lowering of oneDNN's
    # linear fails on these operands
    if grad_input_on_onednn(weight):
        grad_x = _onednn_linear_op(grad, grad_input_operand(weight))  # grad @ weight
    else:
        grad_x = grad @ weight
    if weight.size(0) >= WIDE_OUTPUT:
        grad_weight = _onednn_linear_op(x.t(), grad.t()).t()  # (x.T @ grad).T: oneDNN's fast layout here
    else:
        grad_weight = grad.t() @ x
    return grad_x, grad_weight


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    return linear_grads(x, weight, grad)


_onednn_linear_op.register_autograd(_backward, setup_context=_setup_context)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T (x: M x K, weight: N x K, fp32 on CPU) through oneDNN, differentiable in both; the weight's
    gradient through oneDNN from WIDE_OUTPUT output features, else through torch's mm (MKL)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _onednn_linear_op(x, weight)
    return _onednn_mm_t(x, weight)
