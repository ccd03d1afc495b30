"""Tests of the reference GPT (docs/model.md#architecture) and its optimizer groups (docs/model.md#parameter-groups); CPU, fp32, fast.

Shapes and counts are checked on the meta device at full size (d12-d26); numerics on small models.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from model import common
from model.common import COMPUTE_DTYPE, get_peak_flops, resolve_compute_dtype
from model.gpt import GPT, GPTConfig, apply_rotary_emb, build_model, rotary_tables
from model.sizing import ModelShape, short_window

pytestmark = pytest.mark.skipif(COMPUTE_DTYPE != torch.float32, reason="these tests assume fp32 compute (CPU)")

SPEC_TABLE = {  # depth: (model_dim, heads, VE layers, total params, scaling params, FLOPs/token rounded)
    12: (768, 6, 6, 286_261_730, 110_100_912, 7.597e8),
    16: (1024, 8, 8, 536_871_738, 234_881_792, 1.585e9),
    20: (1280, 10, 10, 896_533_746, 435_160_240, 2.886e9),
    24: (1536, 12, 12, 1_384_122_122, 729_810_624, 4.775e9),
    26: (1664, 13, 13, 1_681_786_938, 918_423_532, 5.991e9),
}
SMALL = dict(sequence_len=64, vocab_size=512, n_layer=4, n_head=2, n_kv_head=2, n_embd=256)


def meta_model(depth: int, **kw) -> GPT:
    shape = ModelShape.from_depth(depth, **kw)
    config = GPTConfig(sequence_len=shape.seq_len, vocab_size=shape.vocab_size, n_layer=depth, n_head=shape.n_head,
                       n_kv_head=shape.n_kv_head, n_embd=shape.model_dim, window_pattern=shape.window_pattern)
    with torch.device("meta"):
        return GPT(config)


def small_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return build_model(GPTConfig(**{**SMALL, **overrides}), "cpu")


@pytest.fixture(scope="module")
def model() -> GPT:
    return small_model()


# --------------------------------------------------------------------------- sizing / accounting

@pytest.mark.parametrize("depth", sorted(SPEC_TABLE))
def test_param_counts_match_spec_and_sizing(depth):
    dim, heads, n_ve, total, scaling, flops = SPEC_TABLE[depth]
    m = meta_model(depth)
    assert (m.config.n_embd, m.config.n_head, len(m.value_embeds)) == (dim, heads, n_ve)
    counts = m.num_scaling_params()
    assert counts["total"] == total
    assert counts["transformer_matrices"] + counts["lm_head"] == scaling
    assert counts == ModelShape.from_depth(depth).param_counts()
    assert m.estimate_flops() == ModelShape.from_depth(depth).flops_per_token()
    assert m.estimate_flops() == pytest.approx(flops, rel=1e-3)


def test_estimate_flops_d24_exact():
    m = meta_model(24)
    assert m.num_matmul_params() == 729_810_648
    assert m.estimate_flops() == 4_775_225_616
    assert m.window_sizes.count(2048) == 6 and m.window_sizes.count(512) == 18
    assert [i for i, w in enumerate(m.window_sizes) if w == 2048] == [3, 7, 11, 15, 19, 23]


def test_module_shapes_d24():
    m = meta_model(24)
    sd = {k: tuple(v.shape) for k, v in m.named_parameters()}
    assert sd["transformer.wte.weight"] == (32768, 1536)
    assert sd["lm_head.weight"] == (32768, 1536)
    assert sd["transformer.h.0.attn.c_q.weight"] == (1536, 1536)
    assert sd["transformer.h.0.mlp.c_fc.weight"] == (6144, 1536)
    assert sd["transformer.h.0.mlp.c_proj.weight"] == (1536, 6144)
    assert sd["transformer.h.1.attn.ve_gate.weight"] == (12, 12)
    assert "transformer.h.0.attn.ve_gate.weight" not in sd
    assert sd["value_embeds.23.weight"] == (32768, 1536)
    assert sd["smear_gate.weight"] == (1, 24)
    assert sd["resid_lambdas"] == (24,) and sd["smear_lambda"] == (1,) and sd["backout_lambda"] == (1,)
    assert tuple(m.cos.shape) == (1, 20480, 1, 64)
    assert "cos" not in m.state_dict() and "sin" not in m.state_dict()


def test_vocab_padding_and_odd_depth():
    m = meta_model(3, vocab_size=1000, seq_len=512)
    assert m.transformer.wte.weight.shape[0] == 1024 and m.lm_head.weight.shape[0] == 1024
    assert sorted(int(k) for k in m.value_embeds) == [0, 2]  # odd n_layer: the even layers
    assert m.window_sizes == [128, 128, 512]
    assert short_window(2048) == 512


def test_decode_and_prefill_flops():
    m = meta_model(12)
    hd, mm = 768, m.num_matmul_params()
    assert m.estimate_decode_flops(1000) == 2 * mm + sum(4 * hd * min(1000, w) for w in m.window_sizes)
    n = 700
    expected = 2 * mm * n + sum(4 * hd * (min(w, n) * (min(w, n) + 1) // 2 + (n - min(w, n)) * min(w, n))
                                for w in m.window_sizes)
    assert m.estimate_prefill_flops(n) == expected


# --------------------------------------------------------------------------------- initialisation

def test_init_statistics(model):
    C, L = 256, 4
    s = math.sqrt(3) / math.sqrt(C)
    wte = model.transformer.wte.weight
    assert wte.dtype == COMPUTE_DTYPE and model.lm_head.weight.dtype == torch.float32
    assert wte.std().item() == pytest.approx(0.8, rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.02)
    uniform = [("c_q", lambda b: b.attn.c_q), ("c_k", lambda b: b.attn.c_k), ("c_v", lambda b: b.attn.c_v)]
    for block in model.transformer.h:
        for _, get in uniform:
            w = get(block).weight
            assert w.abs().max().item() <= s and w.std().item() == pytest.approx(1 / math.sqrt(C), rel=0.03)
        fc = block.mlp.c_fc.weight
        assert fc.abs().max().item() <= 0.4 * s
        assert fc.std().item() == pytest.approx(0.4 / math.sqrt(C), rel=0.03)
        assert torch.count_nonzero(block.attn.c_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.c_proj.weight) == 0
    for emb in model.value_embeds.values():
        assert emb.weight.dtype == COMPUTE_DTYPE
        assert emb.weight.abs().max().item() <= s
        assert emb.weight.std().item() == pytest.approx(1 / math.sqrt(C), rel=0.03)
    resid = torch.tensor([1.15 - 0.10 * i / (L - 1) for i in range(L)], dtype=torch.float32)
    x0 = torch.tensor([0.20 - 0.15 * i / (L - 1) for i in range(L)], dtype=torch.float32)
    assert torch.equal(model.resid_lambdas.data, resid) and torch.equal(model.x0_lambdas.data, x0)
    assert model.resid_lambdas[0].item() == pytest.approx(1.15)
    assert model.resid_lambdas[-1].item() == pytest.approx(1.05)
    assert model.x0_lambdas[-1].item() == pytest.approx(0.05)
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    gates = [model.smear_gate.weight] + [model.transformer.h[i].attn.ve_gate.weight for i in model.ve_layers]
    for g in gates:
        assert g.min().item() >= 0.0 and g.max().item() <= 0.02
    assert model.ve_layers == [1, 3]


def test_init_rng_order_first_draws_wte_then_lm_head():
    torch.manual_seed(123)
    m = build_model(GPTConfig(**SMALL), "cpu")
    torch.manual_seed(123)
    wte = torch.empty(512, 256).normal_(0.0, 0.8)
    lm_head = torch.empty(512, 256).normal_(0.0, 0.001)
    cq = torch.empty(256, 256).uniform_(-math.sqrt(3 / 256), math.sqrt(3 / 256))
    assert torch.equal(m.transformer.wte.weight.float(), wte)
    assert torch.equal(m.lm_head.weight, lm_head)
    assert torch.equal(m.transformer.h[0].attn.c_q.weight, cq)


def test_init_is_deterministic_and_reinit_reproduces(model):
    other = small_model()
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    other.init_weights()
    assert torch.equal(other.transformer.wte.weight, model.transformer.wte.weight)
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(idx), other(idx))


def test_rotary_tables_and_half_split_layout():
    cos, sin = rotary_tables(16, 8, device="cpu")
    assert cos.shape == (1, 16, 1, 4) and cos.dtype == COMPUTE_DTYPE
    j = torch.arange(4, dtype=torch.float32)
    assert torch.allclose(cos[0, 5, 0], torch.cos(5 * 100000.0 ** (-2 * j / 8)))
    x = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8) + 1.0
    y = apply_rotary_emb(x, cos[:, 3:4], sin[:, 3:4])
    x1, x2, c, s = x[..., :4], x[..., 4:], cos[:, 3:4], sin[:, 3:4]
    assert torch.allclose(y, torch.cat((x1 * c + x2 * s, -x1 * s + x2 * c), dim=-1))
    assert torch.allclose(y.norm(), x.norm())  # a rotation


# ------------------------------------------------------------------------------------------ forward

def test_logits_shape_and_softcap(model):
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (2, 32, 512) and logits.dtype == torch.float32
    with torch.no_grad():  # a model with large logits still respects the cap
        big = small_model()
        big.lm_head.weight.mul_(1e4)
        assert big(idx).abs().max().item() <= 15.0
    padded = small_model(vocab_size=500)
    assert padded.lm_head.weight.shape[0] == 512
    with torch.no_grad():
        assert padded(idx.clamp(max=499)).shape == (2, 32, 500)


def test_loss_at_init_and_reductions(model):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 512, (4, 64), generator=g)
    targets = torch.randint(0, 512, (4, 64), generator=g)
    with torch.no_grad():
        loss = model(idx, targets)
        per_token = model(idx, targets, loss_reduction="none")
    assert loss.ndim == 0 and abs(loss.item() - math.log(512)) < 0.05
    assert per_token.shape == (4 * 64,)
    assert torch.allclose(per_token.mean(), loss)
    masked = targets.clone()
    masked[1] = -1
    masked[2, :10] = -1
    with torch.no_grad():
        per_masked = model(idx, masked, loss_reduction="none")
        mean_masked = model(idx, masked)
    keep = masked.view(-1) != -1
    assert torch.all(per_masked[~keep] == 0)
    assert torch.allclose(per_masked[keep], per_token[keep])
    assert torch.allclose(mean_masked, per_token[keep].mean())


def test_backward_reaches_every_parameter(model):
    idx = torch.randint(0, 512, (2, 16))
    m = small_model()
    with torch.no_grad():  # make the zero-initialised projections and smear live so every grad is nonzero
        for block in m.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
        m.smear_lambda.fill_(0.5)
    m(idx, idx).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert torch.count_nonzero(p.grad) > 0, name



def test_the_training_step_compiles_as_one_graph():
    """`torch.compile(model)` must see the whole loss, lm_head and softcap included, as one graph: a graph break
    there (once, a torch.backends call in the lm_head) splits the softcap from the loss and writes the B*T x vocab
    logits out and back in between, ~6% of a CPU training step. fullgraph=True raises on any break."""
    m = small_model(n_layer=2, window_pattern="SL", sequence_len=256)  # the short window masks: T > 128
    assert m.window_sizes[0] < 256
    idx = torch.randint(0, 512, (1, 256))
    eager = m(idx, idx)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(idx, idx)  # traces the backward too
    compiled.backward()
    assert abs(compiled.item() - eager.item()) <= 1e-5 * abs(eager.item())
    assert m.lm_head.weight.grad is not None

def _window_pair(T: int):
    sliding = small_model(seed=3, sequence_len=T, n_layer=2, window_pattern="SL")
    full = small_model(seed=3, sequence_len=T, n_layer=2, window_pattern="L")
    full.load_state_dict(sliding.state_dict())
    with torch.no_grad():  # attention must matter: give it live output projections
        for m in (sliding, full):
            for block in m.transformer.h:
                torch.manual_seed(7)
                block.attn.c_proj.weight.normal_(0, 0.05)
    return sliding, full


def test_sliding_window_only_matters_beyond_the_window():
    # sequence_len 512 -> short window 128 on layer 0; the last layer is always long
    sliding, full = _window_pair(512)
    assert sliding.window_sizes == [128, 512] and full.window_sizes == [512, 512]
    idx = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = sliding(idx), full(idx)
    # positions p <= 128 see at most 129 keys: identical; later positions lose early keys
    assert torch.allclose(a[:, :129], b[:, :129], atol=1e-5)
    assert not torch.allclose(a[:, 129:], b[:, 129:], atol=1e-4)


def _live_model(**overrides) -> GPT:
    """A small model in eval mode whose blocks all matter (at init the output projections are zero)."""
    m = small_model(seed=6, **overrides)
    with torch.no_grad():
        for block in m.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
    return m.eval()


# Selected-position states differ from the full forward's only by GEMM / attention shapes: ~1e-7 in fp32
# (normalised states are O(1)); 1e-5 leaves room for any thread count.
SELECTED_ATOL = 1e-5


@pytest.mark.parametrize("n_layer", [1, 4])  # 1: the backout layer is the last layer itself
def test_hidden_states_at_selected_positions_equal_the_full_forward(n_layer):
    m = _live_model(n_layer=n_layer, window_pattern="SL")  # windows 16 and 64: 150 tokens exceed both
    idx = torch.randint(0, 512, (3, 150), generator=torch.Generator().manual_seed(8))
    positions = torch.tensor([[0, 1, 149], [63, 64, 65], [17, 120, 120]])
    with torch.no_grad():
        full = m.hidden_states(idx)
        selected = m.hidden_states(idx, positions=positions)
        nothing = m.hidden_states(idx, positions=positions[:, :0])
    torch.testing.assert_close(selected, full[torch.arange(3)[:, None], positions], atol=SELECTED_ATOL, rtol=0)
    assert nothing.shape == (3, 0, m.config.n_embd)


def test_hidden_states_at_selected_positions_with_a_kv_cache():
    from model.engine import KVCache, prefill_padded

    m = _live_model(n_layer=3, window_pattern="SL")
    idx = torch.randint(0, 512, (3, 140), generator=torch.Generator().manual_seed(9))
    prompts = [idx[0, :50].tolist(), idx[1, :90].tolist(), idx[2, :7].tolist()]  # rows at different positions
    chunk, positions = idx[:, 90:130], torch.tensor([[0, 20, 39], [5, 5, 6], [38, 39, 0]])
    rows = torch.arange(3)[:, None]
    with torch.no_grad():
        caches = [prefill_padded(m, prompts, 0, 140) for _ in range(2)]
        full = m.hidden_states(chunk, kv_cache=caches[0])
        selected = m.hidden_states(chunk, kv_cache=caches[1], positions=positions)
        torch.testing.assert_close(selected, full[rows, positions], atol=SELECTED_ATOL, rtol=0)
        # every layer's keys and values are computed everywhere, as the full forward computes them
        assert torch.equal(caches[0].k_cache, caches[1].k_cache) and torch.equal(caches[0].v_cache, caches[1].v_cache)
        assert caches[0].positions == caches[1].positions == [90, 130, 47]
        # rows at one position, and S = 0: a cache fill only, bit-identical to the full forward's
        uniform = [KVCache.for_model(m, 2, 100) for _ in range(2)]
        m.hidden_states(idx[:2, :60], kv_cache=uniform[0])
        m.hidden_states(idx[:2, :60], kv_cache=uniform[1], positions=positions[:2, :0])
        assert torch.equal(uniform[0].k_cache, uniform[1].k_cache) and torch.equal(uniform[0].v_cache, uniform[1].v_cache)
        full = m.hidden_states(idx[:2, 60:90], kv_cache=uniform[0])
        in_chunk = positions[:2] % 30
        selected = m.hidden_states(idx[:2, 60:90], kv_cache=uniform[1], positions=in_chunk)
        torch.testing.assert_close(selected, full[rows[:2], in_chunk], atol=SELECTED_ATOL, rtol=0)


def test_causality(model):
    idx = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[0, 25] = (changed[0, 25] + 1) % 512
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_smear_is_noop_at_init_but_not_after():
    m = small_model(seed=4)
    idx = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = m(idx)
        m.smear_gate.weight.zero_()  # gate inputs no longer matter while smear_lambda is 0
        assert torch.equal(m(idx), base)
        m.smear_lambda.fill_(1.0)
        smeared = m(idx)
    assert torch.equal(smeared[:, 0], base[:, 0])  # position 0 is never smeared
    assert not torch.allclose(smeared[:, 1:], base[:, 1:])


def test_backout_is_used():
    # at init every block is the identity (zero projections), so x stays a multiple of x0 and the final
    # norm hides the backout; give the projections weights first
    m = small_model(seed=5)
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        for block in m.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
        base = m(idx)
        m.backout_lambda.fill_(0.0)
        assert not torch.allclose(m(idx), base)


def test_single_token_and_rotary_limit(model):
    with torch.no_grad():
        assert model(torch.tensor([[7]])).shape == (1, 1, 512)
        with pytest.raises(AssertionError):
            model(torch.zeros(1, 10 * 64 + 1, dtype=torch.long))


def test_generate_naive(model):
    prompt = [1, 2, 3, 4]
    greedy = list(model.generate(prompt, max_tokens=6, temperature=0.0))
    assert len(greedy) == 6 and all(0 <= t < 512 for t in greedy)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[len(prompt):]
    s1 = list(model.generate(prompt, max_tokens=8, temperature=1.0, top_k=5, seed=11))
    s2 = list(model.generate(prompt, max_tokens=8, temperature=1.0, top_k=5, seed=11))
    assert s1 == s2
    assert list(model.generate(prompt, max_tokens=4, temperature=1.0, top_k=1)) == greedy[:4]


# ------------------------------------------------------------------------------------- optimizer

def test_optimizer_groups_d24_effective_lrs():
    # speedrun d24: base CLI LRs x batch_lr_scale sqrt(2) (B = 2^20); dmodel_lr_scale = 1/sqrt(2) inside
    m = meta_model(24)
    r2 = math.sqrt(2)
    groups = m.optimizer_groups(unembedding_lr=0.008 * r2, embedding_lr=0.3 * r2, matrix_lr=0.02 * r2,
                                weight_decay=0.059738, scalar_lr=0.5 * r2)
    assert [g["kind"] for g in groups] == ["adamw"] * 6 + ["muon"] * 4
    adamw = groups[:6]
    expected = [  # lr, betas, weight decay
        (0.008, (0.8, 0.96), 0.01), (0.3, (0.8, 0.995), 0.001), (0.15, (0.8, 0.995), 0.01),
        (0.0070711, (0.8, 0.95), 0.05), (0.70711, (0.96, 0.95), 0.0), (0.2, (0.8, 0.95), 0.0),
    ]
    for g, (lr, betas, wd) in zip(adamw, expected):
        assert g["lr"] == pytest.approx(lr, rel=1e-4) and g["betas"] == betas and g["weight_decay"] == wd
        assert g["eps"] == 1e-10
    assert adamw[0]["params"] == [m.lm_head.weight] and adamw[1]["params"] == [m.transformer.wte.weight]
    assert adamw[2]["params"] == list(m.value_embeds.parameters()) and len(adamw[2]["params"]) == 12
    assert adamw[3]["params"] == [m.resid_lambdas] and adamw[4]["params"] == [m.x0_lambdas]
    assert adamw[5]["params"] == [m.smear_gate.weight, m.smear_lambda, m.backout_lambda]
    muon = groups[6:]
    shapes = [tuple(g["params"][0].shape) for g in muon]
    assert shapes == [(12, 12), (1536, 1536), (1536, 6144), (6144, 1536)]
    assert [len(g["params"]) for g in muon] == [12, 96, 24, 24]
    for g in muon:
        assert all(tuple(p.shape) == tuple(g["params"][0].shape) for p in g["params"])
        assert g["lr"] == pytest.approx(0.028284, rel=1e-4) and g["weight_decay"] == 0.059738
        assert (g["momentum"], g["ns_steps"], g["beta2"]) == (0.95, 5, 0.9)
        r, c = g["params"][0].shape
        assert g["lr"] * math.sqrt(max(1, r / c)) == pytest.approx(0.056569 if r > c else 0.028284, rel=1e-4)
    # registration order inside a group: block 0 c_q, c_k, c_v, c_proj, then block 1 ...
    square = muon[1]["params"]
    b0, b1 = m.transformer.h[0], m.transformer.h[1]
    assert square[:8] == [b0.attn.c_q.weight, b0.attn.c_k.weight, b0.attn.c_v.weight, b0.attn.c_proj.weight,
                          b1.attn.c_q.weight, b1.attn.c_k.weight, b1.attn.c_v.weight, b1.attn.c_proj.weight]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))


def test_optimizer_groups_defaults_at_d12():
    groups = meta_model(12).optimizer_groups()
    assert [g["lr"] for g in groups[:6]] == pytest.approx([0.004, 0.2, 0.1, 0.005, 0.5, 0.2])
    assert all(g["lr"] == 0.02 and g["weight_decay"] == 0.0 for g in groups[6:])


def test_setup_optimizer(model):
    if importlib.util.find_spec("model.optim") is None:
        pytest.skip("model/optim.py (MuonAdamW) is not in the repo yet")
    opt = model.setup_optimizer()
    assert len(opt.param_groups) == len(model.optimizer_groups())
    for g, ref in zip(opt.param_groups, model.optimizer_groups()):
        assert g["kind"] == ref["kind"] and g["lr"] == ref["lr"] and g["initial_lr"] == ref["lr"]
        assert [id(p) for p in g["params"]] == [id(p) for p in ref["params"]]


# ---------------------------------------------------------------------------------------- common

def test_compute_dtype_rule():
    assert resolve_compute_dtype({}, None) == torch.float32
    assert resolve_compute_dtype({}, (7, 5)) == torch.float32
    assert resolve_compute_dtype({}, (8, 0)) == torch.bfloat16
    assert resolve_compute_dtype({}, (9, 0)) == torch.bfloat16
    assert resolve_compute_dtype({"NANOCHAT_DTYPE": "float16"}, (9, 0)) == torch.float16
    assert resolve_compute_dtype({"SPEEDRUN_DTYPE": "float32", "NANOCHAT_DTYPE": "bfloat16"}, (9, 0)) == torch.float32
    assert resolve_compute_dtype({"SPEEDRUN_DTYPE": "bfloat16"}, None) == torch.bfloat16
    with pytest.raises(ValueError, match="SPEEDRUN_DTYPE"):
        resolve_compute_dtype({"SPEEDRUN_DTYPE": "bf16"}, None)


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 836e12), ("NVIDIA GB200", 2.5e15), ("NVIDIA B200", 2.25e15),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
    ("AMD Instinct MI300X", 1.3074e15), ("AMD Instinct MI250X", 383e12), ("AMD Instinct MI250", 362.1e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA H800", 756e12), ("Some Unknown GPU", float("inf")),
])
def test_peak_flops(name, flops):
    assert get_peak_flops(name) == flops


def test_print0_only_on_rank_zero(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    common.print0("hidden")
    monkeypatch.setenv("RANK", "0")
    common.print0("shown")
    assert capsys.readouterr().out == "shown\n"


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def test_autodetect_device_type_on_this_machine():
    if torch.cuda.is_available() or _mps_available():
        pytest.skip("a GPU is present: this test pins the answer of a machine without one")
    assert common.autodetect_device_type() == "cpu"


def test_autodetect_device_type_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.autodetect_device_type() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.autodetect_device_type() == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert common.autodetect_device_type() == "cpu"


def test_an_evaluation_process_never_imports_dynamo():
    """Building a model and evaluating it (CORE, bpb, the KV-cache engine) leaves torch._dynamo unimported: its
    import is about a second of every evaluation rank's start. (Training imports it anyway: torch.optim does.)"""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch\n"
        "import model.evaluate, model.chat_eval, model.engine\n"
        "from model.gpt import GPTConfig, build_model\n"
        "from model.core_scoring import evaluation_mode\n"
        "m = build_model(GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64), "
        "'cpu')\n"
        "with evaluation_mode(m):\n"
        "    m(torch.zeros(1, 8, dtype=torch.long))\n"
        "print(sorted(n for n in sys.modules if n.startswith('torch._dynamo')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout
