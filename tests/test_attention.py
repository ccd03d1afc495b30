"""Attention backends (ops/attention.py) against a plain reference attention, on CPU.

The 'sdpa' and 'flex' code paths are both run for real (FlexAttention runs eagerly on CPU); each
is compared with an explicit softmax(QKᵀ/√D + mask)·V computed here in float64. FA3 needs a Hopper
GPU with the kernel installed and is only checked for its availability guard.
"""

import math

import pytest
import torch

from ops import attention as A

# eager FlexAttention (the CPU path) warns that it is the slow unfused implementation
pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")

BACKENDS = ["sdpa", "flex"]
ATOL = 2e-5


@pytest.fixture(params=BACKENDS)
def backend(request):
    A.set_backend_override(request.param)
    yield request.param
    A.set_backend_override(None)


def reference_attention(q, k, v, left=-1, causal=True):
    """softmax(QKᵀ/√D + mask)V in float64; queries aligned to the end of the keys."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.size(1), k.size(2)
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    qpos = torch.arange(Tq).unsqueeze(1) + (Tk - Tq)
    kpos = torch.arange(Tk).unsqueeze(0)
    allow = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        allow &= kpos <= qpos
    if left >= 0:
        allow &= qpos - kpos <= left
    scores = scores.masked_fill(~allow, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def rand_qkv(B=2, Tq=32, Tk=None, H=4, Hkv=None, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tk = Tq if Tk is None else Tk
    Hkv = H if Hkv is None else Hkv
    q = torch.randn(B, Tq, H, D, generator=g)
    k = torch.randn(B, Tk, Hkv, D, generator=g)
    v = torch.randn(B, Tk, Hkv, D, generator=g)
    return q, k, v


def check(out, q, k, v, left=-1, causal=True):
    ref = reference_attention(q, k, v, left, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- flash_attn_func


@pytest.mark.parametrize("T", [32, 64])
def test_full_causal(backend, T):
    q, k, v = rand_qkv(Tq=T)
    check(A.flash_attn_func(q, k, v, causal=True, window_size=(-1, 0)), q, k, v)
    # a window at least as long as the sequence is the same as no window
    check(A.flash_attn_func(q, k, v, causal=True, window_size=(T, 0)), q, k, v)
    check(A.flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)), q, k, v)


@pytest.mark.parametrize("T", [32, 64])
@pytest.mark.parametrize("left", [1, 3, 16])
def test_sliding_window(backend, T, left):
    q, k, v = rand_qkv(Tq=T, seed=left)
    check(A.flash_attn_func(q, k, v, window_size=(left, 0)), q, k, v, left=left)


@pytest.mark.parametrize("left", [-1, 5])
def test_gqa(backend, left):
    q, k, v = rand_qkv(Tq=32, H=4, Hkv=2, seed=3)
    check(A.flash_attn_func(q, k, v, window_size=(left, 0)), q, k, v, left=left)


@pytest.mark.parametrize("left", [-1, 5, 40])
def test_chunked_prefill_tq_ne_tk(backend, left):
    # 8 new queries attending over 32 keys: query i sits at key position 24 + i
    q, k, v = rand_qkv(Tq=8, Tk=32, H=4, Hkv=2, seed=4)
    check(A.flash_attn_func(q, k, v, window_size=(left, 0)), q, k, v, left=left)


@pytest.mark.parametrize("left", [-1, 0, 8, 40])
def test_single_query_decode(backend, left):
    q, k, v = rand_qkv(Tq=1, Tk=33, H=4, Hkv=2, seed=5)
    check(A.flash_attn_func(q, k, v, window_size=(left, 0)), q, k, v, left=left)


def test_non_causal_full(backend):
    q, k, v = rand_qkv(Tq=16, seed=6)
    check(A.flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)), q, k, v, causal=False)


@pytest.mark.parametrize("left", [-1, 3])
def test_gradients_match_reference(backend, left):
    q, k, v = rand_qkv(Tq=32, H=4, Hkv=2, seed=7)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    if backend == "flex" and not torch.cuda.is_available():
        # torch 2.13: FlexAttention has no CPU backward (forward only); the library says so
        with pytest.raises(NotImplementedError, match="backward on CPU"):
            A.flash_attn_func(q, k, v, window_size=(left, 0))
        return
    out = A.flash_attn_func(q, k, v, window_size=(left, 0))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q2, k2, v2, left)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), g.double())
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("w", [0, 1, 3, 7])
def test_window_semantics_constructed(backend, w):
    """left=w lets query p see exactly keys p-w..p: with q = 0 the attention is uniform over the
    visible keys, and v = one-hot(key position) makes the output row p read off which keys those are."""
    T = 16
    q = torch.zeros(1, T, 1, T)
    k = torch.randn(1, T, 1, T)
    v = torch.eye(T).reshape(1, T, 1, T)
    out = A.flash_attn_func(q, k, v, window_size=(w, 0))[0, :, 0, :]
    for p in range(T):
        visible = list(range(max(0, p - w), p + 1))
        expected = torch.zeros(T)
        expected[visible] = 1.0 / len(visible)
        torch.testing.assert_close(out[p], expected, atol=1e-6, rtol=0)
        if p >= w:
            assert len(visible) == w + 1


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("left", [-1, 3])
def test_kvcache_token_by_token_equals_full(backend, left):
    B, T, H, Hkv, D, T_max = 2, 20, 4, 2, 16, 32
    q, k, v = rand_qkv(B=B, Tq=T, H=H, Hkv=Hkv, D=D, seed=8)
    full = A.flash_attn_func(q, k, v, window_size=(left, 0))
    k_cache = torch.zeros(B, T_max, Hkv, D)
    v_cache = torch.zeros(B, T_max, Hkv, D)
    seqlens = torch.zeros(B, dtype=torch.int32)
    outs = []
    for t in range(T):
        o = A.flash_attn_with_kvcache(
            q[:, t:t + 1], k_cache, v_cache, k=k[:, t:t + 1], v=v[:, t:t + 1],
            cache_seqlens=seqlens, causal=True, window_size=(left, 0),
        )
        outs.append(o)
        seqlens += 1
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=ATOL, rtol=0)
    # the caches were written in place, and nothing beyond position T
    assert torch.equal(k_cache[:, :T], k) and torch.equal(v_cache[:, :T], v)
    assert not k_cache[:, T:].any() and not v_cache[:, T:].any()


@pytest.mark.parametrize("left", [-1, 8])
def test_kvcache_prefill_then_decode(backend, left):
    B, H, Hkv, D, T_max = 1, 4, 2, 16, 64
    q, k, v = rand_qkv(B=B, Tq=33, H=H, Hkv=Hkv, D=D, seed=9)
    k_cache = torch.zeros(B, T_max, Hkv, D)
    v_cache = torch.zeros(B, T_max, Hkv, D)
    seqlens = torch.zeros(B, dtype=torch.int32)
    pre = A.flash_attn_with_kvcache(q[:, :16], k_cache, v_cache, k=k[:, :16], v=v[:, :16],
                                    cache_seqlens=seqlens, window_size=(left, 0))
    check(pre, q[:, :16], k[:, :16], v[:, :16], left=left)
    seqlens += 16
    # a second chunk (Tq != Tk inside the cache) and then one decode step
    mid = A.flash_attn_with_kvcache(q[:, 16:32], k_cache, v_cache, k=k[:, 16:32], v=v[:, 16:32],
                                    cache_seqlens=seqlens, window_size=(left, 0))
    check(mid, q[:, 16:32], k[:, :32], v[:, :32], left=left)
    seqlens += 16
    dec = A.flash_attn_with_kvcache(q[:, 32:33], k_cache, v_cache, k=k[:, 32:33], v=v[:, 32:33],
                                    cache_seqlens=seqlens, window_size=(left, 0))
    check(dec, q[:, 32:33], k[:, :33], v[:, :33], left=left)
    # decoding without new keys attends over the cache as it is
    again = A.flash_attn_with_kvcache(q[:, 32:33], k_cache, v_cache, cache_seqlens=seqlens + 1,
                                      window_size=(left, 0))
    torch.testing.assert_close(again, dec, atol=ATOL, rtol=0)


def test_kvcache_overflow_raises():
    k_cache = torch.zeros(1, 4, 1, 8)
    v_cache = torch.zeros(1, 4, 1, 8)
    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match="overflow"):
        A.flash_attn_with_kvcache(q, k_cache, v_cache, k=torch.randn(1, 2, 1, 8), v=torch.randn(1, 2, 1, 8),
                                  cache_seqlens=torch.tensor([3], dtype=torch.int32))


# --------------------------------------------------------------------------- selection


def test_override_and_dispatch_on_cpu():
    q = torch.zeros(1, 4, 2, 8)
    assert A.dispatch(q) == "sdpa"
    try:
        A.set_backend_override("flex")
        assert A.dispatch(q) == "flex"  # eager FlexAttention on CPU: the tests' way to run its code
        A.set_backend_override("sdpa")
        assert A.dispatch(q) == "sdpa"
        with pytest.raises(ValueError):
            A.set_backend_override("xformers")
        with pytest.raises(A.AttentionUnavailable, match="not loaded"):
            A.set_backend_override("fa3")
    finally:
        A.set_backend_override(None)
    assert A.dispatch(q) == "sdpa"


def test_sdpa_and_flex_agree_and_masks_are_cached():
    q, k, v = rand_qkv(Tq=64, H=4, Hkv=2, seed=10)
    outs = {}
    try:
        for name in BACKENDS:
            A.set_backend_override(name)
            outs[name] = A.flash_attn_func(q, k, v, window_size=(16, 0))
        n_masks = len(A._BLOCK_MASKS)
        A.flash_attn_func(q, k, v, window_size=(16, 0))  # same shape/window: no new block mask
        assert len(A._BLOCK_MASKS) == n_masks
    finally:
        A.set_backend_override(None)
    torch.testing.assert_close(outs["sdpa"], outs["flex"], atol=1e-5, rtol=0)


def test_bad_shapes_raise():
    q, k, v = rand_qkv(Tq=8, H=3, Hkv=2)
    with pytest.raises(ValueError):
        A.flash_attn_func(q, k, v)
