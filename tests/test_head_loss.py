"""model/head_loss.py: the fused lm_head loss equals the unfused path (projection, softcap, bounded cross-entropy) and
torch's own tanh + F.cross_entropy, loss and both gradients, for every reduction, eagerly and compiled, and the
model uses it exactly in fp32 CPU training."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model.head_loss import head_cross_entropy
from model.softcap import bounded_cross_entropy, softcap
from ops.cpu_matmul import ONEDNN_AVAILABLE

pytestmark = pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="torch built without oneDNN")

CAP = 15.0


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to fp32 summation order, relative to the largest magnitude (rounding is ~1e-7 per operation)."""
    scale = b.abs().max()
    return a.shape == b.shape and ((a - b).abs().max() <= rel * scale).item() and scale > 0


def inputs(n: int, c: int, v: int, logit_scale: float, seed: int = 0):
    """hidden (n x c, unit RMS as after the final norm), weight (v x c) giving logits of ~logit_scale, targets
    with every fifth row ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = F.rms_norm(torch.randn(n, c, generator=g), (c,))
    weight = torch.randn(v, c, generator=g) * logit_scale / c ** 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -1
    return hidden, weight, targets


def loss_and_grads(loss_fn, hidden, weight, targets, reduction, upstream):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(hidden, weight, targets, reduction)
    (loss * upstream).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


def fused(hidden, weight, targets, reduction):
    return head_cross_entropy(hidden, weight, targets, CAP, ignore_index=-1, reduction=reduction)


def torch_reference(hidden, weight, targets, reduction):
    return F.cross_entropy(CAP * torch.tanh(F.linear(hidden, weight) / CAP), targets, ignore_index=-1,
                           reduction=reduction)


def unfused(hidden, weight, targets, reduction):
    return bounded_cross_entropy(softcap(F.linear(hidden, weight), CAP), targets, bound=CAP, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("logit_scale", [1.0, 8.0, 200.0])  # ordinary, wide, saturated at +-cap
def test_loss_and_both_gradients_equal_the_unfused_path_and_torch(reduction, logit_scale):
    hidden, weight, targets = inputs(96, 32, 1000, logit_scale)
    # an upstream factor as in training: 1/2 for two accumulation steps; per row for 'none' (SFT's masked mean)
    upstream = torch.rand(96, generator=torch.Generator().manual_seed(1)) if reduction == "none" else torch.tensor(0.5)
    got = loss_and_grads(fused, hidden, weight, targets, reduction, upstream)
    for reference in (unfused, torch_reference):
        want = loss_and_grads(reference, hidden, weight, targets, reduction, upstream)
        # the tanh form differs from the sigmoid form by a few ulps of the cap (model/softcap.py)
        assert close(got[0], want[0], rel=2e-6) and close(got[1], want[1]) and close(got[2], want[2])
    if reduction == "none":
        assert torch.all(got[0][::5] == 0)  # ignored rows: no loss ...
    assert torch.all(got[1][::5] == 0)  # ... and no gradient into their hidden state


def test_every_row_ignored_gives_nan_and_no_gradient_as_torch():
    hidden, weight, targets = inputs(8, 16, 300, 1.0)
    targets[:] = -1
    loss, grad_hidden, grad_weight = loss_and_grads(fused, hidden, weight, targets, "mean", torch.tensor(1.0))
    want = loss_and_grads(torch_reference, hidden, weight, targets, "mean", torch.tensor(1.0))
    assert torch.isnan(loss) and torch.isnan(want[0])
    assert not grad_hidden.any() and not grad_weight.any()


def test_a_bad_reduction_is_refused_by_name():
    hidden, weight, targets = inputs(4, 8, 64, 1.0)
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', not 'avg'"):
        head_cross_entropy(hidden, weight, targets, CAP, reduction="avg")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_in_one_graph_equals_eager(reduction):
    hidden, weight, targets = inputs(64, 32, 4096, 4.0)  # 4096: the wide layers' GEMM choices (ops/cpu_matmul.py)
    upstream = torch.rand(64) if reduction == "none" else torch.tensor(0.5)
    compiled = torch.compile(fused, fullgraph=True)
    got = loss_and_grads(compiled, hidden, weight, targets, reduction, upstream)
    want = loss_and_grads(fused, hidden, weight, targets, reduction, upstream)
    assert close(got[0], want[0]) and close(got[1], want[1]) and close(got[2], want[2])


def tiny_model(vocab_size: int = 1000):
    from model.gpt import GPTConfig, build_model

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=16, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                       window_pattern="L")
    model = build_model(config, "cpu")
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # at init it is ~0
    for block in model.transformer.h:  # so that every block's weights get a gradient
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.05)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
    return model


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_model_trains_through_it_with_the_unfused_gradients(reduction):
    """In fp32 CPU training GPT.forward's loss is the fused node (pretraining's mean, SFT's per-token losses); every
    parameter's gradient equals the one through the model's logits and bounded_cross_entropy. The vocabulary (1000)
    is padded in the lm_head (to 1024): the padding rows get no gradient."""
    model = tiny_model()
    idx = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
    targets[:, :4] = -1
    loss = model(idx, targets, loss_reduction=reduction)
    assert type(loss.grad_fn).__name__ == "_HeadCrossEntropyBackward"
    loss.sum().backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    logits = model.logits(model.hidden_states(idx))
    want_loss = bounded_cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), bound=15.0,
                                      reduction=reduction)
    want_loss.sum().backward()
    assert close(loss.detach(), want_loss.detach())
    matrices = [name for name, p in model.named_parameters() if p.dim() == 2 and p.grad is not None]
    assert len(matrices) >= 13  # every block's matrices, the embeddings and the lm_head
    for name in matrices:  # (the scalar lambdas' gradients are sums that cancel to ~1e-6: rounding, not signal)
        want = dict(model.named_parameters())[name].grad
        if not want.any():  # smear_gate at init (smear_lambda = 0)
            assert not got[name].any(), name
        else:
            assert close(got[name], want, rel=1e-4), name
    assert model.lm_head.weight.size(0) == 1024 and torch.all(got["lm_head.weight"][1000:] == 0)


def test_evaluation_keeps_the_unfused_loss():
    """Without autograd (bits per byte, CORE) the loss comes from the logits, as before."""
    model = tiny_model()
    idx, targets = torch.randint(0, 1000, (2, 16)), torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        loss = model(idx, targets)
        logits = model(idx)
    assert loss.grad_fn is None
    assert close(loss, F.cross_entropy(logits.view(-1, 1000), targets.view(-1)))


def test_the_bench_times_both_paths_and_they_agree():
    """bench/head_loss.py at a tiny shape: every key of its JSON, and the two paths' results equal."""
    out = subprocess.run([sys.executable, "-m", "bench.head_loss", "--tokens", "64", "--width", "32", "--vocab",
                          "512", "--repeats", "1"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    for mode in ("eager", "compiled"):
        assert result[mode]["unfused_ms"] > 0 and result[mode]["fused_ms"] > 0 and result[mode]["speedup"] > 0
    assert result["max_loss_rel_diff"] <= 1e-5 and result["max_grad_rel_diff"] <= 1e-5
