"""Attention kernel selection behind one FlashAttention-3-style API (spec/06 part B).

Public functions take and return tensors in FA3's layout, ``B x T x heads x D``, use the default
softmax scale ``1/sqrt(D)``, and accept grouped-query attention (the key/value head count may
divide the query head count):

- ``flash_attn_func(q, k, v, causal=True, window_size=(-1, 0))``
- ``flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=True,
  window_size=(-1, 0))`` -- writes ``k``/``v`` into the caches in place at ``cache_seqlens`` and
  attends over ``cache[:, :pos + T_new]``.

Window semantics: ``(left, 0)`` lets each query see itself and ``left`` previous keys; ``left = -1``
(or any ``left >= Tk``) means unlimited. When ``Tq != Tk`` queries are aligned to the *end* of
the keys (query ``i`` sits at key position ``Tk - Tq + i``), as in FlashAttention.

The backend is decided once at import (``BACKEND``):

1. ``"fa3"``: CUDA is available and a FlashAttention-3 module can be imported (``flash_attn_interface``
   or the Hugging Face ``kernels`` hub package). FA3 only runs bf16 CUDA tensors; other tensors
   fall back to the next backend on their device.
2. ``"flex"``: CUDA without FA3 -- FlexAttention with a causal sliding-window block mask (block
   masks are cached by shape, window and device).
3. ``"sdpa"``: CPU/MPS -- ``scaled_dot_product_attention`` with the window applied as an explicit
   boolean mask (built-in causal mode when no window is needed).

``set_backend_override("sdpa" | "flex" | "fa3" | None)`` forces a backend for tests; ``"flex"``
also works on CPU (eagerly), so the FlexAttention code path is tested for real without a GPU --
forward only: torch (2.13) raises NotImplementedError for FlexAttention backward on CPU.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
import torch.nn.functional as F

__all__ = [
    "BACKEND",
    "HAS_FA3",
    "flash_attn_func",
    "flash_attn_with_kvcache",
    "get_backend",
    "set_backend_override",
]

_BACKENDS = ("fa3", "flex", "sdpa")


# ---------------------------------------------------------------------------------------------
# FA3 discovery (only ever attempted when CUDA is available; never downloads on CPU)
# ---------------------------------------------------------------------------------------------

def _fa3_from_hf_hub():
    """Load FA3 through the Hugging Face ``kernels`` package (spec/06 B.2), or raise.

    That package shares its top-level name with this one, so a plain ``import kernels`` would find
    ourselves. While it is imported *and used*, our entries are taken out of ``sys.modules`` and its
    distribution directory is put first on ``sys.path``; afterwards everything is put back as it was
    (the loaded FA3 module itself does not depend on the package name).
    """
    from importlib import metadata

    dist = metadata.distribution("kernels")  # PackageNotFoundError when not installed
    site_dir = str(dist.locate_file(""))

    def ours_or_theirs(name: str) -> bool:
        return name == "kernels" or name.startswith("kernels.")

    ours = {name: mod for name, mod in sys.modules.items() if ours_or_theirs(name)}
    saved_path = list(sys.path)
    try:
        for name in ours:
            del sys.modules[name]
        sys.path.insert(0, site_dir)
        hub = importlib.import_module("kernels")
        major, _ = torch.cuda.get_device_capability()
        if major == 9:
            repo = "varunneal/flash-attention-3"
        elif hasattr(hub, "has_kernel") and hub.has_kernel("kernels-community/flash-attn3"):
            repo = "kernels-community/flash-attn3"
        else:
            return None
        kernel = hub.get_kernel(repo)
        return getattr(kernel, "flash_attn_interface", kernel)
    finally:
        for name in [n for n in sys.modules if ours_or_theirs(n)]:
            del sys.modules[name]
        sys.modules.update(ours)
        sys.path[:] = saved_path


def _load_fa3():
    """Return a module exposing FA3's ``flash_attn_func``/``flash_attn_with_kvcache``, or None.

    Tried only when CUDA is available: first a locally installed ``flash_attn_interface``, then the
    hub kernel. Any failure (package missing, no network, unsupported GPU) just means "no FA3".
    """
    if not torch.cuda.is_available():
        return None
    try:
        mod = importlib.import_module("flash_attn_interface")
        if hasattr(mod, "flash_attn_func"):
            return mod
    except Exception:
        pass
    try:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        mod = _fa3_from_hf_hub()
        return mod if mod is not None and hasattr(mod, "flash_attn_func") else None
    except Exception:
        return None


_FA3 = _load_fa3()
HAS_FA3: bool = _FA3 is not None

if HAS_FA3:
    BACKEND: str = "fa3"
elif torch.cuda.is_available():
    BACKEND = "flex"
else:
    BACKEND = "sdpa"

_OVERRIDE: str | None = None


def set_backend_override(name: str | None) -> None:
    """Force a backend ("fa3", "flex", "sdpa") or go back to automatic selection (None)."""
    global _OVERRIDE
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {_BACKENDS} or None")
    if name == "fa3":
        assert HAS_FA3, "FlashAttention-3 is not available on this machine"
    _OVERRIDE = name


def get_backend(t: torch.Tensor | None = None) -> str:
    """The backend a call with tensor ``t`` would use (the override, else ``BACKEND`` adapted to t)."""
    if _OVERRIDE is not None:
        return _OVERRIDE
    if t is None:
        return BACKEND
    if t.is_cuda:
        if HAS_FA3 and t.dtype == torch.bfloat16:
            return "fa3"
        return "flex"
    return "sdpa"


# ---------------------------------------------------------------------------------------------
# window helpers
# ---------------------------------------------------------------------------------------------

def _effective_window(causal: bool, window_size) -> tuple[int, int]:
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return left, right


def _needs_mask(left: int, right: int, Tq: int, Tk: int) -> bool:
    """True unless every query may see every key (non-causal, unbounded window)."""
    return not ((left < 0 or left >= Tk) and (right < 0 or right >= Tk))


def _window_mask(Tq: int, Tk: int, left: int, right: int, device) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True = attend. Query i sits at key position (Tk - Tq) + i."""
    qpos = torch.arange(Tq, device=device).unsqueeze(1) + (Tk - Tq)
    kpos = torch.arange(Tk, device=device).unsqueeze(0)
    allow = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if right >= 0:
        allow &= kpos - qpos <= right
    if left >= 0:
        allow &= qpos - kpos <= left
    return allow


# ---------------------------------------------------------------------------------------------
# SDPA path (spec/06 B.3)
# ---------------------------------------------------------------------------------------------

def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """q: B x Tq x H x D, k/v: B x Tk x Hkv x D -> B x Tq x H x D."""
    Tq, Tk = q.size(1), k.size(1)
    gqa = q.size(2) != k.size(2)
    causal = right == 0
    if causal and Tq == 1:
        # decode: the single query sits at the last key position, so causality is free; a window
        # just keeps the last left+1 keys.
        if 0 <= left < Tk:
            k, v = k[:, Tk - (left + 1):], v[:, Tk - (left + 1):]
        mask, is_causal = None, False
    elif causal and (left < 0 or left >= Tq) and Tq == Tk:
        mask, is_causal = None, True
    elif not causal and not _needs_mask(left, right, Tq, Tk):
        mask, is_causal = None, False
    else:
        mask, is_causal = _window_mask(Tq, Tk, left, right, q.device), False
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kwargs = {"enable_gqa": True} if gqa else {}
    y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=is_causal, **kwargs)
    return y.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# FlexAttention path
# ---------------------------------------------------------------------------------------------

_BLOCK_MASKS: dict = {}
_flex_compiled = None


def _block_mask(Tq: int, Tk: int, left: int, right: int, device):
    """Cached FlexAttention block mask for (Tq, Tk, window, device)."""
    key = (Tq, Tk, left, right, str(device))
    bm = _BLOCK_MASKS.get(key)
    if bm is None:
        from torch.nn.attention.flex_attention import create_block_mask

        offset = Tk - Tq

        def mask_mod(b, h, q_idx, kv_idx):
            qpos = q_idx + offset
            allow = qpos >= 0  # a tensor of the right shape, all True for valid queries
            if right >= 0:
                allow = allow & (kv_idx - qpos <= right)
            if left >= 0:
                allow = allow & (qpos - kv_idx <= left)
            return allow

        bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=Tq, KV_LEN=Tk, device=device)
        _BLOCK_MASKS[key] = bm
    return bm


def _flex_fn(device: torch.device):
    """FlexAttention: compiled on CUDA (fused kernel), eager elsewhere (tests on CPU)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """q: B x Tq x H x D, k/v: B x Tk x Hkv x D -> B x Tq x H x D."""
    Tq, Tk = q.size(1), k.size(1)
    gqa = q.size(2) != k.size(2)
    bm = _block_mask(Tq, Tk, left, right, q.device) if _needs_mask(left, right, Tq, Tk) else None
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    # (eager use, i.e. CPU tests, warns that the unfused path materialises the scores)
    y = _flex_fn(q.device)(qt, kt, vt, block_mask=bm, enable_gqa=gqa)
    return y.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be B x T x heads x D")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.size(2) % k.size(2) != 0:
        raise ValueError(f"query heads ({q.size(2)}) must be a multiple of key/value heads ({k.size(2)})")


def _fa3_out(result):
    return result[0] if isinstance(result, tuple) else result


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, 0),
) -> torch.Tensor:
    """Attention of q (B x Tq x H x D) over k, v (B x Tk x Hkv x D); returns B x Tq x H x D."""
    _check(q, k, v)
    backend = get_backend(q)
    if backend == "fa3":
        return _fa3_out(_FA3.flash_attn_func(q, k, v, causal=causal, window_size=tuple(window_size)))
    left, right = _effective_window(causal, window_size)
    if backend == "flex":
        return _flex(q, k, v, left, right)
    return _sdpa(q, k, v, left, right)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, 0),
) -> torch.Tensor:
    """Insert k, v (B x T_new x Hkv x D) into the caches (B x T_max x Hkv x D) in place at
    ``cache_seqlens`` (int32, shape (B,)) and attend q (B x T_new x H x D) over the first
    ``pos + T_new`` cached positions. Rows may sit at different positions (as in FA3): off FA3 such
    a batch writes each row at its own position and attends with a per-row mask (SDPA).
    """
    backend = get_backend(q)
    if backend == "fa3":
        return _fa3_out(_FA3.flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
            causal=causal, window_size=tuple(window_size),
        ))
    if (k is None) != (v is None):
        raise ValueError("pass both k and v, or neither")
    if cache_seqlens is not None and cache_seqlens.numel() > 1:
        seqlens = cache_seqlens.tolist()
        if any(p != seqlens[0] for p in seqlens):
            return _kvcache_ragged(q, k_cache, v_cache, k, v, seqlens, causal, window_size)
    pos = int(cache_seqlens[0]) if cache_seqlens is not None else 0
    t_new = k.size(1) if k is not None else 0
    if pos + t_new > k_cache.size(1):
        raise ValueError(f"KV cache overflow: {pos} + {t_new} > {k_cache.size(1)} slots")
    if k is not None:
        k_cache[:, pos:pos + t_new] = k
        v_cache[:, pos:pos + t_new] = v
    keys, values = k_cache[:, :pos + t_new], v_cache[:, :pos + t_new]
    _check(q, keys, values)
    left, right = _effective_window(causal, window_size)
    # Inference lengths change every step: automatic mode uses SDPA here (no per-length block
    # masks or recompiles); an explicit "flex" override is honoured so tests cover that path too.
    if _OVERRIDE == "flex":
        return _flex(q, keys, values, left, right)
    return _sdpa(q, keys, values, left, right)


def _kvcache_ragged(q, k_cache, v_cache, k, v, seqlens: list[int], causal: bool, window_size) -> torch.Tensor:
    """flash_attn_with_kvcache for rows at different positions: row b writes at seqlens[b] and its query i
    sits at key position seqlens[b] + i; keys past a row's own end are masked out."""
    t_new = k.size(1) if k is not None else 0
    Tq, T_max = q.size(1), k_cache.size(1)
    if max(seqlens) + t_new > T_max:
        raise ValueError(f"KV cache overflow: {max(seqlens)} + {t_new} > {T_max} slots")
    starts = torch.tensor(seqlens, device=q.device)
    if k is not None:  # row b's new keys go to slots seqlens[b] .. seqlens[b] + t_new - 1
        rows = torch.arange(len(seqlens), device=q.device).unsqueeze(1)
        slots = starts.unsqueeze(1) + torch.arange(t_new, device=q.device)
        k_cache[rows, slots] = k.to(k_cache.dtype)
        v_cache[rows, slots] = v.to(v_cache.dtype)
    Tk = max(seqlens) + t_new
    keys, values = k_cache[:, :Tk], v_cache[:, :Tk]
    _check(q, keys, values)
    left, right = _effective_window(causal, window_size)
    ends = starts + t_new  # B: one past each row's last key
    qpos = (ends - Tq).unsqueeze(1) + torch.arange(Tq, device=q.device)  # B x Tq, aligned to each row's end
    kpos = torch.arange(Tk, device=q.device)
    allow = (kpos.view(1, 1, Tk) < ends.view(-1, 1, 1)).expand(-1, Tq, -1)  # B x Tq x Tk
    rel = kpos.view(1, 1, Tk) - qpos.unsqueeze(-1)  # key minus query position
    if right >= 0:
        allow = allow & (rel <= right)
    if left >= 0:
        allow = allow & (-rel <= left)
    qt, kt, vt = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    kwargs = {"enable_gqa": True} if q.size(2) != keys.size(2) else {}
    y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allow.unsqueeze(1), **kwargs)
    return y.transpose(1, 2)
