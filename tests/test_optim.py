"""Tests for model/optim.py (docs/model.md#optimizer): AdamW parity with torch, Muon
numerics (orthogonality, coefficients, LR scaling, cautious WD, NorMuon), determinism,
convergence, schedules, state_dict resume, and the distributed step under torchrun + gloo."""

from __future__ import annotations

import importlib.util
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.optim import MuonAdamW
from model.optim_steps import POLAR_EXPRESS_COEFFS, muon_lr_scale, muon_step_fused, normuon
from model.schedules import get_lr_multiplier, get_muon_momentum, get_weight_decay

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "optim_dist_worker.py"


def muon_group(params, lr=0.02, momentum=0.95, beta2=0.9, weight_decay=0.0):
    return dict(kind="muon", params=params, lr=lr, momentum=momentum, ns_steps=5, beta2=beta2, weight_decay=weight_decay)


def adamw_group(params, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
    return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def first_muon_delta(shape, grad_seed=0, weight_decay=0.0, p0=None):
    """Parameter change of one Muon step (momentum 0, beta2 1, lr 1) on a random gradient."""
    gen = torch.Generator().manual_seed(grad_seed)
    p = torch.nn.Parameter(torch.zeros(shape) if p0 is None else p0.clone())
    opt = MuonAdamW([muon_group([p], lr=1.0, momentum=0.0, beta2=1.0, weight_decay=weight_decay)])
    p.grad = torch.randn(shape, generator=gen)
    before = p.detach().clone()
    opt.step()
    return p.detach() - before


# ---------------------------------------------------------------------------------------------- AdamW


def test_adamw_matches_torch():
    gen = torch.Generator().manual_seed(0)
    shapes = [(48,), (16, 8), (256, 4)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = MuonAdamW([adamw_group(ours)])
    ref_opt = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(10):
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert opt.state[ours[0]]["step"] == 10


def test_adamw_keeps_storage_dtype():
    p = torch.nn.Parameter(torch.randn(64, 32).bfloat16())
    opt = MuonAdamW([adamw_group([p], lr=0.1)])
    p.grad = torch.randn(64, 32).bfloat16()
    before = p.detach().clone()
    opt.step()
    assert p.dtype == torch.bfloat16
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16 and opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    assert not torch.equal(p.detach(), before)


def test_groups_are_validated():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError):
        MuonAdamW([dict(kind="sgd", params=[p], lr=0.1)])
    with pytest.raises(ValueError):
        MuonAdamW([muon_group([p, torch.nn.Parameter(torch.zeros(4, 8))])])
    opt = MuonAdamW([muon_group([p], lr=0.03)])
    assert opt.param_groups[0]["initial_lr"] == 0.03


# ---------------------------------------------------------------------------------------------- Muon


def test_polar_express_coefficients():
    assert POLAR_EXPRESS_COEFFS == (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    )


@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
def test_first_muon_update_is_near_orthogonal(shape):
    delta = first_muon_delta(shape)
    sv = torch.linalg.svdvals(delta.double())
    sv = sv / sv.mean()
    assert sv.max() / sv.min() < 4


def test_muon_lr_scale_for_tall_matrices():
    assert muon_lr_scale(4 * 32, 32) == 2.0
    assert muon_lr_scale(32, 4 * 32) == 1.0
    assert muon_lr_scale(32, 32) == 1.0
    # Muon+ renormalises O to sqrt(min(r, c)) and NorMuon keeps that norm: ||dP|| = lr_eff * sqrt(min(r, c)).
    tall = first_muon_delta((128, 32)).norm().item()
    wide = first_muon_delta((32, 128)).norm().item()
    assert tall == pytest.approx(2.0 * math.sqrt(32), rel=1e-4)
    assert wide == pytest.approx(math.sqrt(32), rel=1e-4)


def test_cautious_weight_decay_only_where_update_agrees_with_param():
    shape, wd = (32, 64), 0.25
    p0 = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    plain = first_muon_delta(shape, weight_decay=0.0, p0=p0)
    decayed = first_muon_delta(shape, weight_decay=wd, p0=p0)
    o = -plain  # lr_eff = 1 for a wide matrix: dP = -O without weight decay
    mask = (o * p0) >= 0
    assert mask.any() and (~mask).any()
    torch.testing.assert_close(decayed - plain, -wd * p0 * mask, rtol=0, atol=1e-6)
    assert torch.equal(decayed[~mask], plain[~mask])


@pytest.mark.parametrize("shape,red_dim", [((3, 16, 8), -1), ((3, 8, 16), -2)])
def test_normuon_preserves_frobenius_norm(shape, red_dim):
    gen = torch.Generator().manual_seed(3)
    o = torch.randn(shape, generator=gen) * torch.rand(shape[0], shape[1], 1, generator=gen)
    s_shape = list(shape)
    s_shape[red_dim] = 1
    second = torch.rand(s_shape, generator=gen) + 0.1
    before = second.clone()
    out = normuon(o, second, torch.tensor(0.9), red_dim)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), o.norm(dim=(-2, -1)), rtol=1e-5, atol=0)
    q = o.square().mean(dim=red_dim, keepdim=True)
    torch.testing.assert_close(second, before + 0.1 * (q - before))
    # beta2 = 0: S = q, so every row (column) ends with the same mean square.
    out0 = normuon(o, torch.zeros(s_shape), torch.tensor(0.0), red_dim)
    ms = out0.square().mean(dim=red_dim)
    torch.testing.assert_close(ms, ms.mean(dim=-1, keepdim=True).expand_as(ms), rtol=1e-4, atol=0)


def test_muon_bf16_compute_path_close_to_fp32():
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(2, 32, 64, generator=gen)
    params = torch.randn(2, 32, 64, generator=gen) * 0.1
    results = []
    for use_bf16 in (False, True):
        p = params.clone()
        m, s = torch.zeros_like(p), torch.zeros(2, 1, 64)
        muon_step_fused(grads, p, m, s, torch.tensor(0.9), torch.tensor(0.02), torch.tensor(0.1), torch.tensor(0.9), 5, use_bf16)
        assert p.dtype == torch.float32
        results.append(p - params)
    rel = (results[0] - results[1]).norm() / results[0].norm()
    assert rel < 0.1  # bf16 Polar Express: a few percent of difference is expected


def test_step_functions_are_single_graphs_without_hyperparameter_recompiles():
    """The CUDA path compiles both step functions with fullgraph=True; check with dynamo's tracer
    (a counting backend, no inductor) that they trace whole and that new hyper-parameter values
    (0-D tensors) reuse the graph."""
    from model.optim_steps import adamw_step_fused

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    T = lambda v: torch.tensor(float(v))  # noqa: E731
    torch._dynamo.reset()
    try:
        muon = torch.compile(muon_step_fused, fullgraph=True, dynamic=False, backend=counting_backend)
        adamw = torch.compile(adamw_step_fused, fullgraph=True, dynamic=False, backend=counting_backend)
        p, g = torch.randn(2, 64, 32), torch.randn(2, 64, 32)
        m, s = torch.zeros_like(p), torch.zeros(2, 64, 1)
        for mu, lr in ((0.85, 0.02), (0.9, 0.01)):
            muon(g, p, m, s, T(mu), T(lr), T(0.1), T(0.9), 5, False)
        v = torch.zeros_like(p)
        for step, lr in ((1, 0.01), (2, 0.005)):
            adamw(p, g, m, v, T(step), T(lr), T(0.8), T(0.95), T(1e-10), T(0.01))
        assert len(graphs) == 2
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- whole optimizer


def make_mixed(seed=0):
    gen = torch.Generator().manual_seed(seed)
    small = torch.nn.Parameter(torch.randn(48, generator=gen) * 0.1)
    large = torch.nn.Parameter(torch.randn(1024, 4, generator=gen) * 0.1)
    wide = [torch.nn.Parameter(torch.randn(32, 64, generator=gen) * 0.02) for _ in range(3)]
    tall = [torch.nn.Parameter(torch.randn(64, 32, generator=gen) * 0.02) for _ in range(2)]
    params = [small, large, *wide, *tall]
    targets = [torch.randn(p.shape, generator=gen) * 0.1 for p in params]
    return params, targets


def make_mixed_optimizer(params):
    small, large, *rest = params
    wide, tall = rest[:3], rest[3:]
    return MuonAdamW([
        adamw_group([small], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
        adamw_group([large], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
        muon_group(tall, lr=0.02, momentum=0.95, weight_decay=0.0),
        muon_group(wide, lr=0.02, momentum=0.95, weight_decay=0.0),
    ])


def quadratic_steps(opt, params, targets, steps):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = sum(((p - t) ** 2).sum() for p, t in zip(params, targets))
        loss.backward()
        opt.step()


def test_determinism_bitwise():
    finals = []
    for _ in range(2):
        params, targets = make_mixed()
        quadratic_steps(make_mixed_optimizer(params), params, targets, 8)
        finals.append([p.detach().clone() for p in params])
    for a, b in zip(*finals):
        assert torch.equal(a, b)


def test_convergence_on_quadratic():
    params, targets = make_mixed()
    start = [(p - t).norm().item() for p, t in zip(params, targets)]
    quadratic_steps(make_mixed_optimizer(params), params, targets, 50)
    end = [(p - t).norm().item() for p, t in zip(params, targets)]
    for d0, d1 in zip(start, end):
        assert d1 < 0.5 * d0, (start, end)


def test_state_dict_round_trip_resumes_bitwise():
    params, targets = make_mixed()
    opt = make_mixed_optimizer(params)
    quadratic_steps(opt, params, targets, 5)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params]}, buf)
    quadratic_steps(opt, params, targets, 5)

    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    params2 = [torch.nn.Parameter(t) for t in saved["params"]]
    opt2 = make_mixed_optimizer(params2)
    opt2.load_state_dict(saved["opt"])
    quadratic_steps(opt2, params2, targets, 5)
    for a, b in zip(params, params2):
        assert torch.equal(a.detach(), b.detach())


# ---------------------------------------------------------------------------------------------- schedules


def test_lr_multiplier():
    f = lambda it: get_lr_multiplier(it, 100, 10, 0.5, 0.05)  # noqa: E731  (warmdown = 50 steps)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == 1.0 and f(30) == 1.0 and f(50) == 1.0
    assert f(51) == pytest.approx(0.98 + 0.02 * 0.05)
    assert f(75) == pytest.approx(0.5 + 0.5 * 0.05)
    assert f(99) == pytest.approx(0.02 + 0.98 * 0.05)  # p = (100 - 99) / 50
    assert get_lr_multiplier(5, 100, 0, 0.0, 0.05) == 1.0  # no warmup, no warmdown


def test_muon_momentum():
    f = lambda it: get_muon_momentum(it, 1000, 0.5)  # noqa: E731  (warmdown starts at 500)
    assert f(0) == pytest.approx(0.85)
    assert f(200) == pytest.approx(0.91)
    assert f(400) == 0.97 and f(499) == 0.97
    assert f(500) == pytest.approx(0.97)
    assert f(750) == pytest.approx(0.935)
    assert f(999) == pytest.approx(0.97 - 0.07 * 499 / 500)
    # The 400-step ramp takes precedence over the warmdown in short runs.
    assert get_muon_momentum(99, 100, 0.5) == pytest.approx(0.85 + 0.12 * 99 / 400)


def test_weight_decay_cosine():
    assert get_weight_decay(0, 100, 0.2) == pytest.approx(0.2)
    assert get_weight_decay(50, 100, 0.2) == pytest.approx(0.1)
    assert get_weight_decay(100, 100, 0.2) == pytest.approx(0.0, abs=1e-12)
    assert get_weight_decay(25, 100, 0.2) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))


# ---------------------------------------------------------------------------------------------- distributed


def _load_worker():
    spec = importlib.util.spec_from_file_location("optim_dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_distributed_matches_single_process_mean_gradient(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["world"] == 2 and r["resumed_equal"] for r in ranks)
    for a, b in zip(ranks[0]["final"], ranks[1]["final"]):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0]["init"], ranks[1]["init"]):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["grads"][0], ranks[1]["grads"][0]))

    # Same steps in this (non-distributed) process with the mean gradient.
    worker = _load_worker()
    params = worker.make_params()
    for p, init in zip([p for ps in params for p in ps], ranks[0]["init"]):
        assert torch.equal(p.detach(), init)
    opt = worker.make_optimizer(params)
    for step in range(worker.NUM_STEPS):
        mean = iter([(g0 + g1) / 2 for g0, g1 in zip(ranks[0]["grads"][step], ranks[1]["grads"][step])])
        worker.run_step(opt, params, [[next(mean) for _ in ps] for ps in params], step)
    single = worker.flat(params)
    for a, b in zip(single, ranks[0]["final"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    moved = [not torch.equal(a, b) for a, b in zip(ranks[0]["init"], ranks[0]["final"])]
    assert all(moved)


# ------------------------------------------------------------------------------- compiled step functions


def _three_steps(compile: bool) -> tuple[list[torch.Tensor], MuonAdamW]:
    torch.manual_seed(0)
    muon_params = [torch.nn.Parameter(torch.randn(12, 20)) for _ in range(2)]
    adamw_param = torch.nn.Parameter(torch.randn(7, 3))
    opt = MuonAdamW([muon_group(muon_params, weight_decay=0.1), adamw_group([adamw_param])], compile=compile)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in (*muon_params, adamw_param):
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in (*muon_params, adamw_param)], opt


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_functions_on_cpu_match_eager(fresh_dynamo):
    """model.train compiles the optimizer on CPU when it compiles the model: same updates as eager."""
    eager, opt = _three_steps(compile=False)
    assert not opt.adamw_step.is_compiled and not opt.muon_step.is_compiled
    compiled, opt = _three_steps(compile=True)
    assert opt.adamw_step.is_compiled and opt.muon_step.is_compiled and opt.muon_step.fallback_reason is None
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_failure_falls_back_to_eager_and_says_why(fresh_dynamo, monkeypatch):
    """A machine where inductor cannot build (no C++ compiler) trains eagerly, with one warning per function."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # a cached kernel would not need the compiler
    eager, _ = _three_steps(compile=False)
    with pytest.warns(RuntimeWarning, match="running it eagerly") as caught:
        fallback, opt = _three_steps(compile=True)
    assert sum("running it eagerly" in str(w.message) for w in caught) == 2  # once per step function
    assert not opt.muon_step.is_compiled and "C++ compiler" in opt.muon_step.fallback_reason
    assert all(torch.equal(a, b) for a, b in zip(fallback, eager))
