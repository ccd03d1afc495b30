"""ops/cpu_matmul.py: the lm_head's oneDNN GEMMs on CPU equal torch's own linear within fp32 rounding, in the
forward and both gradients, eagerly, under torch.compile, in evaluation, and through the model's lm_head."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ops.cpu_matmul import ONEDNN_AVAILABLE, onednn_linear, onednn_linear_usable

pytestmark = pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="torch built without oneDNN")


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to fp32 summation order: 1e-5 of the largest magnitude (rounding is ~1e-7 per add)."""
    return a.shape == b.shape and ((a - b).abs().max() <= 1e-5 * b.abs().max()).item()


def inputs(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.1, torch.randn(m, n, generator=g)


@pytest.mark.parametrize("m,k,n", [(64, 32, 128), (37, 48, 300), (512, 64, 4096)])
def test_forward_and_both_gradients_equal_torch_linear(m, k, n):
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


def test_compiled_equals_eager():
    x, w, upstream = inputs(128, 64, 1024)

    def loss(x, w):  # the model's shape of use: a soft-capped projection
        return (15 * torch.tanh(onednn_linear(x, w) / 15) * upstream).sum()

    compiled = torch.compile(loss, fullgraph=True)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    l1, l2 = compiled(x, w1), loss(x, w2)
    l1.backward()
    l2.backward()
    assert abs(l1.item() - l2.item()) <= 1e-5 * abs(l2.item()) and close(w1.grad, w2.grad)


def test_usable_only_for_fp32_cpu_tensors():
    x, w, _ = inputs(4, 8, 16)
    assert onednn_linear_usable(x, w)
    assert not onednn_linear_usable(x.bfloat16(), w.bfloat16())
    assert not onednn_linear_usable(x.double(), w.double())


def test_the_lm_head_uses_it_on_cpu_and_equals_a_plain_linear():
    from model.gpt import GPTConfig, Linear, VocabProjection, build_model

    model = build_model(GPTConfig(sequence_len=8, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32), "cpu")
    head = model.lm_head
    assert type(head) is VocabProjection
    torch.nn.init.normal_(head.weight, std=0.1)  # at init it is ~0
    plain = Linear(32, head.weight.size(0))
    plain.weight = torch.nn.Parameter(head.weight.detach().clone())
    x = torch.randn(2, 5, 32)
    y1, y2 = head(x), plain(x)
    assert y1.shape == (2, 5, head.weight.size(0)) and close(y1, y2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    assert close(head.weight.grad, plain.weight.grad)


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
