"""model/softcap.py: the sigmoid-form softcap equals cap * tanh(z / cap), and the bounded cross-entropy equals
F.cross_entropy (loss and gradient, every reduction, ignored targets, saturated logits), eagerly and compiled."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model.softcap import bounded_cross_entropy, softcap

CAP = 15.0


def logits(n: int, v: int, scale: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


def targets(n: int, v: int, ignored: int, seed: int = 1) -> torch.Tensor:
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    t[:ignored] = -1
    return t


def test_softcap_is_the_tanh_cap_and_stays_within_it():
    z = torch.cat([torch.linspace(-200, 200, 40001), torch.tensor([0.0, 1e-8, -1e-8, 1e30, -1e30])])
    capped = softcap(z, CAP)
    # 1e-5 absolute at cap 15 is ~100 fp32 ulps of 0.5 * 15; the two forms differ by a few
    assert (capped - CAP * torch.tanh(z / CAP)).abs().max().item() <= 1e-5
    assert capped.min().item() >= -CAP and capped.max().item() <= CAP
    assert capped[-2].item() == CAP and capped[-1].item() == -CAP


def reference_and_bounded(z, t, reduction):
    """(loss, dloss/dz) from tanh + F.cross_entropy and from softcap + bounded_cross_entropy."""
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    ref = F.cross_entropy(CAP * torch.tanh(z1 / CAP), t, ignore_index=-1, reduction=reduction)
    new = bounded_cross_entropy(softcap(z2, CAP), t, bound=CAP, ignore_index=-1, reduction=reduction)
    weights = torch.linspace(0.5, 1.5, t.numel()) if reduction == "none" else torch.tensor(1.0)
    (ref * weights).sum().backward()
    (new * weights).sum().backward()
    return ref.detach(), new.detach(), z1.grad, z2.grad


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to fp32 summation order and the softcap's form: `rel` of the largest magnitude."""
    return a.shape == b.shape and ((a - b).abs().max() <= rel * b.abs().max()).item()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scale", [0.5, 4.0, 1000.0])  # near-linear, typical, saturated at +-cap
def test_bounded_cross_entropy_equals_torch_cross_entropy(reduction, scale):
    z, t = logits(64, 1000, scale), targets(64, 1000, ignored=5)
    ref, new, ref_grad, new_grad = reference_and_bounded(z, t, reduction)
    assert torch.isfinite(new).all() and torch.isfinite(new_grad).all()
    assert close(new, ref) and close(new_grad, ref_grad)
    assert ref_grad[:5].abs().max().item() == 0 and new_grad[:5].abs().max().item() == 0  # ignored rows
    if reduction == "none":
        assert new[:5].abs().max().item() == 0 and new[5:].min().item() > 0


def test_saturated_logits_neither_overflow_nor_underflow():
    # every logit at -cap but one at +cap: the largest term is exp(0), the others exp(-2 cap)
    v = 32768
    z = torch.full((4, v), -1e6)
    t = torch.tensor([0, 1, v - 1, 7])
    z[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 1e6  # rows 0, 1: the target is the +cap one
    loss = bounded_cross_entropy(softcap(z, CAP), t, bound=CAP, reduction="none")
    ref = F.cross_entropy(CAP * torch.tanh(z / CAP), t, reduction="none")
    assert torch.isfinite(loss).all()
    assert loss[:2].abs().max().item() <= 1e-6  # log(1 + (v-1) e^-30) rounds to 0 in fp32
    assert (loss[2:] - 2 * CAP).abs().max().item() <= 1e-4  # 2 cap + log(1 + (v-1) e^-30)
    assert (loss - ref).abs().max().item() <= 1e-5 * 2 * CAP


def test_all_targets_ignored_gives_nan_as_torch_does():
    z, t = logits(4, 10, 1.0), torch.full((4,), -1)
    assert torch.isnan(bounded_cross_entropy(softcap(z, CAP), t, bound=CAP)).item()
    assert torch.isnan(F.cross_entropy(z, t, ignore_index=-1)).item()


def test_an_unknown_reduction_is_refused_by_name():
    with pytest.raises(ValueError, match="reduction must be"):
        bounded_cross_entropy(logits(2, 3, 1.0), torch.zeros(2, dtype=torch.long), bound=CAP, reduction="avg")


def test_compiled_equals_eager():
    z, t = logits(128, 4096, 4.0), targets(128, 4096, ignored=3)

    def loss_and_grad(fn):
        zz = z.clone().requires_grad_()
        loss = fn(zz, t)
        loss.backward()
        return loss.detach(), zz.grad

    def fn(zz, tt):
        return bounded_cross_entropy(softcap(zz, CAP), tt, bound=CAP)

    eager_loss, eager_grad = loss_and_grad(fn)
    compiled_loss, compiled_grad = loss_and_grad(torch.compile(fn, fullgraph=True, dynamic=False))
    assert close(compiled_loss, eager_loss) and close(compiled_grad, eager_grad)


def test_the_bench_times_both_ways_and_they_agree():
    """bench/softcap_loss.py at a tiny shape: every key of its JSON, and the two losses equal."""
    out = subprocess.run([sys.executable, "-m", "bench.softcap_loss", "--tokens", "64", "--vocab", "512",
                          "--repeats", "1"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    for mode in ("eager", "compiled"):
        assert result[mode]["torch_ms"] > 0 and result[mode]["softcap_ms"] > 0 and result[mode]["speedup"] > 0
    assert result["max_loss_diff"] <= 1e-4 and result["max_grad_rel_diff"] <= 1e-5
