"""FP8 tensorwise training (ops/fp8.py) on CPU with the real ``torch._scaled_mm``.

On CPU ``_scaled_mm`` with float32 output equals the dequantised matmul exactly (shared
notes/torch-cpu-facts.md), so the forward and both backward GEMMs are checked for equality with
hand-computed dequantised products, using the same FP8 pairings as on H100 (e4m3 x e4m3 forward,
e5m2 gradients against e4m3 operands).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ops.fp8 import (
    FP8_E4M3_MAX,
    FP8_E5M2_MAX,
    Float8Linear,
    convert_to_float8_training,
    disable_fp8,
    fp8_module_filter,
    quantize_tensorwise,
    tensorwise_scale,
)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


class BiasFreeLinear(nn.Linear):
    """Like the model's own Linear: a subclass whose constructor takes no ``bias`` argument."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def dequant(t8, inv):
    return t8.float() * inv


def make_fp8_layer(in_f=128, out_f=256, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    return lin, Float8Linear.from_linear(lin)


# --------------------------------------------------------------------------- scaling


def test_fp8_maxima():
    assert FP8_E4M3_MAX == torch.finfo(E4M3).max == 448.0
    assert FP8_E5M2_MAX == torch.finfo(E5M2).max == 57344.0


@pytest.mark.parametrize("dtype,half_step", [(E4M3, 2.0**-4), (E5M2, 2.0**-3)])
def test_quantize_dequantize_relative_error(dtype, half_step):
    """Round-to-nearest with 3 (e4m3) / 2 (e5m2) mantissa bits: for values that land in the normal
    range after scaling, |dequant(x) - x| <= half a step = 2^-4 |x| (e4m3), 2^-3 |x| (e5m2)."""
    torch.manual_seed(0)
    x = torch.randn(4096) * torch.logspace(-3, 3, 4096)
    x8, inv = quantize_tensorwise(x, dtype)
    assert x8.dtype == dtype and inv.dtype == torch.float32 and inv.dim() == 0
    err = (dequant(x8, inv) - x).abs()
    normal = (x.abs() / inv) >= torch.finfo(dtype).smallest_normal
    assert normal.sum() > 2000  # about 4.4 of the 6 decades of |x| land in e4m3's normal range
    bound = half_step * x.abs() * (1 + 1e-6)  # 1e-6: the fp32 roundings of scale·x and x8·inv
    assert bool((err[normal] <= bound[normal]).all()), (err / x.abs())[normal].max()
    # the largest magnitude maps onto the format's maximum
    assert x8.float().abs().max().item() == torch.finfo(dtype).max


def test_scale_hand_computed():
    t = torch.tensor([1.0, -2.0, 0.5, 0.25])
    x8, inv = quantize_tensorwise(t, E4M3)
    assert tensorwise_scale(torch.tensor(2.0), FP8_E4M3_MAX).item() == 224.0
    assert x8.float().tolist() == [224.0, -448.0, 112.0, 56.0]
    assert torch.equal(inv, torch.tensor(1.0 / 224.0, dtype=torch.float32))
    # e5m2: 57344 / 2 = 28672; 0.25 * 28672 = 7168 = 1.75 * 2^12 is representable
    x8, inv = quantize_tensorwise(t, E5M2)
    assert x8.float().tolist() == [28672.0, -57344.0, 14336.0, 7168.0]
    # a non-power-of-two amax: the division is done in float64, then rounded once to float32
    amax = torch.tensor([3.0, -1.0]).abs().amax()
    expected = torch.tensor(448.0 / 3.0, dtype=torch.float32)  # Python float = float64 division
    assert torch.equal(tensorwise_scale(amax, FP8_E4M3_MAX), expected)
    assert tensorwise_scale(amax, FP8_E4M3_MAX).dtype == torch.float32


def test_amax_uses_fp32_for_low_precision_input():
    t = torch.tensor([0.0, -3.0, 1.0], dtype=torch.bfloat16)
    x8, inv = quantize_tensorwise(t, E4M3)
    assert inv.dtype == torch.float32
    assert inv.item() == (1.0 / torch.tensor(448.0 / 3.0, dtype=torch.float32)).item()
    assert x8.float().tolist()[1] == -448.0


def test_zero_tensor_uses_the_floor():
    z = torch.zeros(8, 16)
    scale = tensorwise_scale(torch.tensor(0.0), FP8_E4M3_MAX)
    assert torch.equal(scale, torch.tensor(448.0 / 1e-12, dtype=torch.float32))
    x8, inv = quantize_tensorwise(z, E4M3)
    assert torch.isfinite(inv) and inv.item() > 0
    assert not x8.float().any()
    assert torch.equal(dequant(x8, inv), z)


@pytest.mark.parametrize("amax", [1.7, 13.0, 3.0, 1e-9, 1e20])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_saturation_at_fmax(amax, dtype):
    """amax·scale can round above fmax in fp32 (e.g. 1.7 -> 448.00003); the clamp saturates it."""
    fmax = torch.finfo(dtype).max
    t = torch.tensor([amax, -amax, amax / 2, 0.0])
    x8, _ = quantize_tensorwise(t, dtype)
    vals = x8.float()
    assert torch.isfinite(vals).all()
    assert vals[0].item() == fmax and vals[1].item() == -fmax
    assert vals.abs().max().item() <= fmax


def test_floor_below_1e_12():
    # an amax under the 1e-12 floor is not scaled up to fmax: the scale is 448 / 1e-12
    t = torch.tensor([1e-20, -1e-20])
    x8, inv = quantize_tensorwise(t, E4M3)
    assert torch.equal(inv, torch.tensor(448.0 / 1e-12, dtype=torch.float32).reciprocal())
    assert x8.float().abs().max().item() < FP8_E4M3_MAX


def test_unsaturated_cast_would_overflow():
    # why the explicit clamp matters: a plain cast out of e5m2's range is inf (the CPU cast to
    # e4m3fn happens to saturate in torch 2.13; the c10 scalar conversion gives NaN), never fmax
    assert torch.isinf(torch.tensor(1e6).to(E5M2).float())
    assert quantize_tensorwise(torch.tensor([1e6, 1.0]), E5M2)[0].float()[0].item() == FP8_E5M2_MAX


# --------------------------------------------------------------------------- Float8Linear numerics


def test_forward_equals_dequantised_matmul_exactly():
    lin, f8 = make_fp8_layer()
    x = torch.randn(64, 128)
    y = f8(x)
    x8, xi = quantize_tensorwise(x, E4M3)
    w8, wi = quantize_tensorwise(lin.weight.detach(), E4M3)
    assert y.dtype == torch.float32
    assert torch.equal(y, dequant(x8, xi) @ dequant(w8, wi).T)


def test_backward_equals_dequantised_products_exactly():
    lin, f8 = make_fp8_layer(seed=1)
    x = torch.randn(48, 128, requires_grad=True)
    y = f8(x)
    g = torch.randn_like(y)
    y.backward(g)
    x8, xi = quantize_tensorwise(x.detach(), E4M3)
    w8, wi = quantize_tensorwise(lin.weight.detach(), E4M3)
    g8, gi = quantize_tensorwise(g, E5M2)  # gradients in e5m2
    assert torch.equal(x.grad, dequant(g8, gi) @ dequant(w8, wi))
    assert torch.equal(lin.weight.grad, dequant(g8, gi).T @ dequant(x8, xi))
    assert lin.weight.grad.dtype == torch.float32


def test_close_to_high_precision_linear():
    """Bound: relative Frobenius error < 0.08 forward (measured ~0.04: e4m3 rounding) and < 0.12
    for both gradients (measured ~0.06: e5m2 gradients have one mantissa bit less)."""
    lin, f8 = make_fp8_layer(in_f=256, out_f=128, seed=2)
    x = torch.randn(4, 16, 256, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y = f8(x)
    y_ref = F.linear(xr, lin.weight.detach().clone().requires_grad_())
    assert y.shape == (4, 16, 128)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(y, y_ref) < 0.08
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert rel(x.grad, xr.grad) < 0.12
    w_grad_ref = g.reshape(-1, 128).T @ xr.detach().reshape(-1, 256)
    assert rel(lin.weight.grad, w_grad_ref) < 0.12


def test_bf16_input_and_bias():
    lin, f8 = make_fp8_layer(bias=True, seed=3)
    with torch.no_grad():
        lin.bias.normal_()
    x = torch.randn(2, 16, 128, dtype=torch.bfloat16, requires_grad=True)
    y = f8(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 16, 256)
    ref = F.linear(x.detach().float(), lin.weight.detach(), lin.bias.detach())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.08
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert lin.weight.grad.dtype == torch.float32 and lin.bias.grad is not None


def test_optimizer_updates_the_shared_weight():
    lin, f8 = make_fp8_layer(seed=4)
    before = lin.weight.detach().clone()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)  # built on the original layer
    f8(torch.randn(32, 128)).square().mean().backward()
    opt.step()
    assert not torch.equal(lin.weight.detach(), before)
    assert f8.weight is lin.weight


# --------------------------------------------------------------------------- filter and conversion


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.smear_gate = nn.Linear(24, 1, bias=False)
        self.ve_gate = nn.Linear(12, 2, bias=False)
        self.odd = nn.Linear(120, 128, bias=False)
        self.block = nn.ModuleDict({"c_fc": BiasFreeLinear(128, 256), "c_proj": nn.Linear(256, 128)})
        self.lm_head = BiasFreeLinear(128, 512)


def test_filter():
    assert not fp8_module_filter(nn.Linear(24, 1), "smear_gate")
    assert not fp8_module_filter(nn.Linear(12, 2), "ve_gate")
    assert not fp8_module_filter(nn.Linear(120, 128), "odd")  # not a multiple of 16
    assert not fp8_module_filter(nn.Linear(112, 256), "small")  # min dim < 128
    assert fp8_module_filter(nn.Linear(128, 256), "c_fc")
    assert fp8_module_filter(BiasFreeLinear(256, 128), "c_proj")
    assert not fp8_module_filter(nn.Conv1d(128, 128, 1), "conv")


def test_convert_shares_parameters_and_keeps_state_dict():
    m = Toy()
    ids = {n: id(p) for n, p in m.named_parameters()}
    sd_before = {k: v.clone() for k, v in m.state_dict().items()}
    n = convert_to_float8_training(m, module_filter_fn=fp8_module_filter)
    assert n == 3
    assert isinstance(m.block["c_fc"], Float8Linear) and isinstance(m.block["c_proj"], Float8Linear)
    assert isinstance(m.lm_head, Float8Linear)
    for name in ("smear_gate", "ve_gate", "odd"):
        assert type(getattr(m, name)) is nn.Linear
    assert {n: id(p) for n, p in m.named_parameters()} == ids
    sd = m.state_dict()
    assert list(sd) == list(sd_before)
    assert all(torch.equal(sd[k], sd_before[k]) for k in sd)
    assert m.lm_head._orig_class is BiasFreeLinear and m.block["c_proj"]._orig_class is nn.Linear
    assert m.lm_head.weight.device.type == "cpu"  # the meta shell holds the real Parameter
    assert convert_to_float8_training(m) == 0  # already converted
    assert convert_to_float8_training(Toy(), module_filter_fn=lambda mod, fqn: fqn == "lm_head") == 1


def test_disable_fp8_swaps_back_and_restores():
    m = Toy()
    convert_to_float8_training(m)
    fp8_mods = {n: mod for n, mod in m.named_modules() if isinstance(mod, Float8Linear)}
    ids = {n: id(p) for n, p in m.named_parameters()}
    x = torch.randn(3, 128)
    with disable_fp8(m):
        assert type(m.lm_head) is BiasFreeLinear
        assert type(m.block["c_fc"]) is BiasFreeLinear and type(m.block["c_proj"]) is nn.Linear
        assert not any(isinstance(mod, Float8Linear) for mod in m.modules())
        assert {n: id(p) for n, p in m.named_parameters()} == ids
        assert torch.equal(m.lm_head(x), x @ m.lm_head.weight.T)  # plain high-precision math
        assert list(m.state_dict()) == list(Toy().state_dict())
    assert {n: mod for n, mod in m.named_modules() if isinstance(mod, Float8Linear)} == fp8_mods
    assert all(mod is fp8_mods[n] for n, mod in m.named_modules() if n in fp8_mods)


def test_disable_fp8_restores_on_exception():
    m = Toy()
    convert_to_float8_training(m)
    head = m.lm_head
    with pytest.raises(RuntimeError, match="boom"):
        with disable_fp8(m):
            assert type(m.lm_head) is BiasFreeLinear
            raise RuntimeError("boom")
    assert m.lm_head is head and isinstance(m.lm_head, Float8Linear)
    assert isinstance(m.block["c_proj"], Float8Linear)


def test_opaque_to_the_compiler():
    """The FP8 matmul is one allow_in_graph autograd Function: a whole-graph compile (aot_eager:
    dynamo + AOT autograd, no C++ build, so it is quick) traces around it and gives the same
    gradients as eager."""
    lin, f8 = make_fp8_layer(seed=5)
    x = torch.randn(32, 128, requires_grad=True)

    def loss_fn(inp):
        return f8(inp).square().mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad, lin.weight.grad = None, None
    loss_fn(x).backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, lin.weight.grad)
