"""ops/cpu_matmul.py: the lm_head's oneDNN GEMMs on CPU equal torch's own linear within fp32 rounding, in the
forward and both gradients, eagerly, under torch.compile, in evaluation, and through the model's lm_head."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ops.cpu_matmul import (ONEDNN_AVAILABLE, WIDE_GRAD_INPUT_ON_ONEDNN, WIDE_OUTPUT, grad_input_on_onednn,
                             onednn_linear, onednn_linear_usable)

pytestmark = pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="torch built without oneDNN")


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to fp32 summation order: 1e-5 of the largest magnitude (rounding is ~1e-7 per add)."""
    return a.shape == b.shape and ((a - b).abs().max() <= 1e-5 * b.abs().max()).item()


def inputs(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.1, torch.randn(m, n, generator=g)


@pytest.mark.parametrize("m,k,n", [(64, 32, 128), (37, 48, 300), (512, 64, WIDE_OUTPUT), (40, 16, 2 * WIDE_OUTPUT)])
def test_forward_and_both_gradients_equal_torch_linear(m, k, n):
    """Both backward paths: narrow (grad_W through torch's mm) and from WIDE_OUTPUT (grad_W through oneDNN)."""
    x, w, upstream = inputs(m, k, n)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y1, y2 = onednn_linear(x1, w1), F.linear(x2, w2)
    (y1 * upstream).sum().backward()
    (y2 * upstream).sum().backward()
    assert close(y1, y2) and close(x1.grad, x2.grad) and close(w1.grad, w2.grad)
    assert not torch.equal(y1, torch.zeros_like(y1))


def test_gradient_accumulates_over_micro_steps_and_evaluation_needs_no_grad():
    x, w, upstream = inputs(96, 32, 256)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    for half in (x[:48], x[48:]):  # two micro-steps into one .grad
        (onednn_linear(half, w1) * upstream[:48]).sum().backward()
        (F.linear(half, w2) * upstream[:48]).sum().backward()
    assert close(w1.grad, w2.grad)
    with torch.no_grad():
        y = onednn_linear(x, w1)
    assert y.grad_fn is None and close(y, F.linear(x, w))


@pytest.mark.parametrize("n", [1024, WIDE_OUTPUT])
def test_compiled_equals_eager(n):
    x, w, upstream = inputs(128, 64, n)

    def loss(x, w):  # the model's shape of use: a soft-capped projection
        return (15 * torch.tanh(onednn_linear(x, w) / 15) * upstream).sum()

    compiled = torch.compile(loss, fullgraph=True)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    l1, l2 = compiled(x, w1), loss(x, w2)
    l1.backward()
    l2.backward()
    # the loss sums 128 x n terms of either sign: its rounding scales with their magnitudes, not with the sum
    magnitude = (15 * torch.tanh(F.linear(x, w) / 15) * upstream).abs().sum().item()
    assert abs(l1.item() - l2.item()) <= 1e-6 * magnitude and close(w1.grad, w2.grad)


def test_usable_only_for_fp32_cpu_tensors():
    x, w, _ = inputs(4, 8, 16)
    assert onednn_linear_usable(x, w)
    assert not onednn_linear_usable(x.bfloat16(), w.bfloat16())
    assert not onednn_linear_usable(x.double(), w.double())


class OpsCalled(TorchDispatchMode):
    """Records the name of every operator that reaches the dispatcher (forward and backward)."""

    def __enter__(self):
        self.names = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


ONEDNN_OPS = {"mkldnn._linear_pointwise", "speedrun.onednn_linear"}  # the op's autograd calls show as itself


def gemms(names: set[str]) -> set[str]:
    """The GEMMs among `names`, each oneDNN one as "onednn"."""
    return {"onednn" if n in ONEDNN_OPS else n for n in names
            if n in ONEDNN_OPS or n in ("aten.mm", "aten.addmm", "aten.linear", "aten.matmul")}


def tiny_model():
    from model.gpt import GPTConfig, build_model

    config = GPTConfig(sequence_len=8, vocab_size=WIDE_OUTPUT, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    model = build_model(config, "cpu")
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # at init it is ~0
    torch.nn.init.normal_(model.transformer.h[0].mlp.c_proj.weight, std=0.1)
    return model


@pytest.mark.parametrize("layer", ["lm_head", "c_fc", "c_proj"])
def test_the_model_linears_use_it_in_cpu_training_and_equal_torch_linear(layer):
    """Every linear layer runs its forward through oneDNN in fp32 CPU training; the weight's gradient through
    oneDNN from WIDE_OUTPUT output features (the lm_head), through torch's mm (MKL) below (the blocks' layers);
    grad_x through oneDNN, except the lm_head's on a CPU without AVX-512 (torch's mm). Results equal F.linear's."""
    from model.gpt import VocabProjection

    model = tiny_model()
    module = model.lm_head if layer == "lm_head" else getattr(model.transformer.h[0].mlp, layer)
    assert (type(module) is VocabProjection) == (layer == "lm_head")
    x = torch.randn(2, 5, module.in_features)
    weight = module.weight.detach().clone().requires_grad_()
    with OpsCalled() as forward:
        y1 = module(x)
    y2 = F.linear(x, weight)
    assert y1.shape == (2, 5, module.out_features) and close(y1, y2)
    with OpsCalled() as backward:
        y1.square().sum().backward()
    y2.square().sum().backward()
    assert close(module.weight.grad, weight.grad)
    assert gemms(forward.names) == {"onednn"}
    if layer != "lm_head":
        assert gemms(backward.names) == {"onednn", "aten.mm"}
    else:
        assert gemms(backward.names) == ({"onednn"} if WIDE_GRAD_INPUT_ON_ONEDNN else {"onednn", "aten.mm"})


def test_grad_x_library_follows_the_cpu_instruction_set():
    """Narrow layers always take oneDNN's grad_x; a vocabulary-wide one only with AVX-512 kernels."""
    assert WIDE_GRAD_INPUT_ON_ONEDNN == torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert grad_input_on_onednn(torch.empty(WIDE_OUTPUT - 1, 8))
    assert grad_input_on_onednn(torch.empty(WIDE_OUTPUT, 8)) == WIDE_GRAD_INPUT_ON_ONEDNN


def test_evaluation_keeps_torch_linear_except_for_the_lm_head():
    """Without autograd (evaluation, sampling: few rows a call) the block linears stay on F.linear, where oneDNN's
    per-call cost (~30 us) is larger than the GEMM; the lm_head still uses oneDNN, faster from a single row."""
    model = tiny_model()
    fc, head = model.transformer.h[0].mlp.c_fc, model.lm_head
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), OpsCalled() as ops:
        y = fc(x)
    assert torch.equal(y, F.linear(x, fc.weight)) and "onednn" not in gemms(ops.names)
    with torch.no_grad(), OpsCalled() as ops:
        head(x)
    assert gemms(ops.names) == {"onednn"}


def test_evaluation_forward_never_imports_dynamo():
    """The custom op (first call imports torch._dynamo) is used only where autograd or compile needs it."""
    code = ("import sys, json, torch\n"
            "from ops.cpu_matmul import onednn_linear\n"
            "x, w = torch.randn(8, 4), torch.randn(16, 4)\n"
            "with torch.no_grad(): onednn_linear(x, w)\n"
            "print(json.dumps('torch._dynamo' in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False, out.stderr


def test_the_bench_times_both_ways_and_they_agree():
    """bench/cpu_matmul.py at a tiny shape: every key of its JSON, and the two libraries' products equal."""
    out = subprocess.run([sys.executable, "-m", "bench.cpu_matmul", "--tokens", "64", "--width", "32", "--vocab", "256",
                          "--repeats", "1"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    for gemm in ("forward", "grad_x", "grad_w"):
        assert result[gemm]["mkl_ms"] >= 0 and result[gemm]["onednn_ms"] >= 0 and result[gemm]["speedup"] > 0
    assert result["total_speedup"] > 0 and result["max_rel_diff"] <= 1e-5
    assert result["grad_x_in_training"] == "onednn"  # 256 output features: narrow
