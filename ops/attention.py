"""Attention behind one FlashAttention-style API, on the fastest backend this machine has (docs/model.md#attention-backends).

Public functions take and return tensors in FlashAttention's layout, ``B x T x heads x D``, use the
default softmax scale ``1/sqrt(D)``, and accept grouped-query attention (the key/value head count may
divide the query head count):

- ``flash_attn_func(q, k, v, causal=True, window_size=(-1, 0))``
- ``flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=True,
  window_size=(-1, 0), cache_positions=None)`` -- writes ``k``/``v`` into the caches in place at
  ``cache_seqlens`` and attends over ``cache[:, :pos + T_new]``; ``cache_positions`` is the same positions
  on the host (the model keeps them), so decoding never waits on the GPU to read them.

Window semantics: ``(left, 0)`` lets each query see itself and ``left`` previous keys; ``left = -1``
(or any ``left >= Tk``) means unlimited. When ``Tq != Tk`` queries are aligned to the *end* of
the keys (query ``i`` sits at key position ``Tk - Tq + i``), as in FlashAttention.

Backends (``BACKENDS``), best first on a GPU:

- ``"fa3"``: FlashAttention-3 (Hopper, bf16): a locally built ``flash_attn_interface``, or the Hugging Face
  ``kernels`` hub build (``pip install -e ".[gpu]"``; downloaded on first use into the Hugging Face cache,
  which an air-gapped node reads with ``HF_HUB_OFFLINE=1``). Works inside ``torch.compile``.
- ``"fa4"``: FlashAttention-4 (CuTe DSL, Hopper and Blackwell, ``pip install -e ".[gpu]"``). Its autograd
  function is opaque to the compiler, so a compiled model breaks its graph around each attention call.
- ``"flex"``: FlexAttention with a causal sliding-window block mask, fused only where the model is compiled:
  ``torch.compile`` traces it into the model's graph. Uncompiled calls on a GPU (evaluation, CORE, the
  engine) use SDPA instead of running FlexAttention unfused (which materialises B x H x T x T scores) or
  compiling a separate kernel per shape.
- ``"sdpa"``: ``scaled_dot_product_attention`` with the window as an explicit boolean mask (built-in causal
  mode when no window is needed): CPU, MPS, and the fallback for tensors a fused kernel does not take.

``configure(requested)`` chooses once per process -- ``"auto"`` (the best available), ``"fused"`` (fa3, else
fa4, else an error), or one backend by name -- and returns a ``Selection`` that says which backend runs and
why the better ones were not chosen; entry points log it and record it in their summary. A request that
cannot be met raises ``AttentionUnavailable`` naming the option and the install command. Nothing is probed
or downloaded at import. ``set_backend_override(name | None)`` forces a backend for tests; ``"flex"`` also
runs on CPU (eagerly, forward only: torch 2.13 has no FlexAttention backward on CPU).

This module is ``ops.attention``, not ``kernels.attention``: the top-level name ``kernels`` belongs to the
Hugging Face hub package that serves FA3, and both must be importable in one process.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "REQUESTS",
    "AttentionUnavailable",
    "Selection",
    "active",
    "configure",
    "dispatch",
    "route",
    "flash_attn_func",
    "flash_attn_with_kvcache",
    "select",
    "set_backend_override",
]

BACKENDS = ("fa3", "fa4", "flex", "sdpa")
FUSED = ("fa3", "fa4")
REQUESTS = ("auto", "fused", *BACKENDS)
INSTALL = 'pip install -e ".[gpu]"'
# The FA3 hub build the reference uses on Hopper, then the community build for other capabilities.
FA3_HUB_REPOS = {9: "varunneal/flash-attention-3"}
FA3_HUB_FALLBACK_REPO = "kernels-community/flash-attn3"


class AttentionUnavailable(RuntimeError):
    """A requested attention backend cannot run here; the message names the option and the fix."""


@dataclass(frozen=True)
class Selection:
    """What `configure` chose: the backend bf16 CUDA tensors run on, and why (including why not the others)."""

    requested: str
    backend: str
    reason: str
    device_type: str

    def as_dict(self) -> dict:
        return {"attention_backend": self.backend, "attention_requested": self.requested,
                "attention_reason": self.reason}


# ---------------------------------------------------------------------------------------------
# discovery of the fused kernels (on demand, never at import)
# ---------------------------------------------------------------------------------------------

def _probe_fa3(capability: tuple[int, int] | None):
    """(module with flash_attn_func / flash_attn_with_kvcache, "") or (None, why not)."""
    if capability is None:
        return None, "needs a CUDA GPU"
    if capability[0] != 9:
        return None, f"FA3 is built for Hopper (sm90); this GPU is sm{capability[0]}{capability[1]}"
    why = []
    try:
        module = importlib.import_module("flash_attn_interface")
        if hasattr(module, "flash_attn_func"):
            return module, ""
        why.append("flash_attn_interface has no flash_attn_func")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not this way"
        why.append(f"no local flash_attn_interface ({type(exc).__name__})")
    try:
        hub = importlib.import_module("kernels")  # Hugging Face's kernels hub package (ours is `ops`)
    except Exception as exc:  # noqa: BLE001
        why.append(f"Hugging Face 'kernels' hub package not installed ({type(exc).__name__})")
        return None, "; ".join(why)
    repo = FA3_HUB_REPOS.get(capability[0], FA3_HUB_FALLBACK_REPO)
    try:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        kernel = hub.get_kernel(repo)
        module = getattr(kernel, "flash_attn_interface", kernel)
        if hasattr(module, "flash_attn_func"):
            return module, ""
        why.append(f"hub kernel {repo} has no flash_attn_func")
    except Exception as exc:  # noqa: BLE001 - no build for this torch/CUDA, no network and no cache, ...
        why.append(f"hub kernel {repo} did not load ({type(exc).__name__}: {str(exc)[:200]}); offline nodes need "
                   "it in the Hugging Face cache (README: Attention on GPUs)")
    return None, "; ".join(why)


def _probe_fa4(capability: tuple[int, int] | None):
    if capability is None:
        return None, "needs a CUDA GPU"
    if capability[0] not in (9, 10):
        return None, f"FA4 runs on Hopper and Blackwell (sm90/sm100); this GPU is sm{capability[0]}{capability[1]}"
    try:
        module = importlib.import_module("flash_attn.cute")
    except Exception as exc:  # noqa: BLE001
        return None, f"flash-attn-4 not installed ({type(exc).__name__})"
    if not hasattr(module, "flash_attn_func"):
        return None, "flash_attn.cute has no flash_attn_func"
    return module, ""


PROBES = {"fa3": _probe_fa3, "fa4": _probe_fa4}


def _cuda_capability(device_type: str) -> tuple[int, int] | None:
    if device_type == "cuda" and torch.cuda.is_available():
        return tuple(torch.cuda.get_device_capability())
    return None


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def select(requested: str = "auto", device_type: str | None = None,
           capability: tuple[int, int] | None = None) -> tuple[Selection, object | None]:
    """(Selection, the loaded fused module or None) for `requested` on `device_type` (default: this machine).
    `capability` overrides the GPU's (tests simulate a Hopper this way). Raises AttentionUnavailable."""
    if requested not in REQUESTS:
        raise AttentionUnavailable(f"runtime.attention={requested!r} is not an attention backend; "
                                   f"fix: use one of {', '.join(REQUESTS)}")
    device_type = device_type or _default_device_type()
    if capability is None:
        capability = _cuda_capability(device_type)
    if device_type != "cuda" and capability is None:
        if requested in ("auto", "sdpa"):
            return Selection(requested, "sdpa", f"{device_type}: SDPA with explicit window masks "
                             "(fused kernels and fused FlexAttention need CUDA)", device_type), None
        if requested == "flex":
            return Selection(requested, "flex", f"{device_type}: FlexAttention requested (eager, unfused: "
                             "for tests)", device_type), None
        raise AttentionUnavailable(
            f"runtime.attention={requested} needs a CUDA GPU with FlashAttention (this is {device_type}); "
            f"fix: run on a Hopper/Blackwell node with {INSTALL}, or --set runtime.attention=auto")
    tried = {}
    candidates = {"auto": FUSED, "fused": FUSED, "fa3": ("fa3",), "fa4": ("fa4",)}.get(requested, ())
    for name in candidates:
        module, why = PROBES[name](capability)
        if module is not None:
            not_chosen = "; ".join(f"{n}: {w}" for n, w in tried.items())
            reason = f"{name} loaded" + (f" ({not_chosen})" if not_chosen else "")
            return Selection(requested, name, reason, device_type), module
        tried[name] = why
    if requested in ("fused", "fa3", "fa4"):
        raise AttentionUnavailable(
            f"runtime.attention={requested} but no fused attention kernel loads here: "
            + "; ".join(f"{n}: {w}" for n, w in tried.items())
            + f"; fix: {INSTALL} on this node (README: Attention on GPUs), or --set runtime.attention=flex "
              "to train on FlexAttention (about 9% fewer tokens/s at d12)")
    backend = "sdpa" if requested == "sdpa" else "flex"
    if requested == "auto":
        reason = ("FlexAttention in compiled code, SDPA elsewhere, because no fused kernel loads: "
                  + "; ".join(f"{n}: {w}" for n, w in tried.items()) + f" (fix: {INSTALL})")
    else:
        reason = f"{backend} requested"
    return Selection(requested, backend, reason, device_type), None


_SELECTION: Selection | None = None
_FUSED_MODULE = None
_OVERRIDE: str | None = None
_FA4_CALL = None


def configure(requested: str = "auto", device_type: str | None = None) -> Selection:
    """Choose the backend for this process (see `select`) and return the Selection; call once at start."""
    global _SELECTION, _FUSED_MODULE, _FA4_CALL
    _SELECTION, _FUSED_MODULE = select(requested, device_type)
    if _SELECTION.backend == "fa4" and _FA4_CALL is None:
        # FA4's autograd function is opaque to dynamo: a graph break around each call. Wrapped here rather than
        # by a decorator at import, because torch.compiler.disable imports dynamo: ~1 s of every process start.
        _FA4_CALL = torch.compiler.disable(_fa4_eager)
    return _SELECTION


def active() -> Selection:
    """The configured Selection (configuring "auto" on first use)."""
    return _SELECTION if _SELECTION is not None else configure("auto")


def set_backend_override(name: str | None) -> None:
    """Force a backend ("fa3", "fa4", "flex", "sdpa") or go back to the configured one (None); for tests."""
    global _OVERRIDE
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS} or None")
    if name in FUSED and not (active().backend == name and _FUSED_MODULE is not None):
        raise AttentionUnavailable(f"{name} is not loaded in this process (configured: {active().backend})")
    _OVERRIDE = name


def route(backend: str, *, cuda: bool, dtype: torch.dtype, compiling: bool, forced: bool = False) -> str:
    """Where a call goes, as a pure rule: `backend` is the configured (or `forced`, by set_backend_override) one,
    for a query on CUDA or not, of `dtype`, inside a torch.compile trace or not."""
    if not cuda:
        return "flex" if backend == "flex" else "sdpa"  # eager FlexAttention off CUDA: for tests
    if backend in FUSED:
        if dtype == torch.bfloat16 or (backend == "fa4" and dtype == torch.float16):
            return backend
        backend = "flex"  # e.g. fp32 CUDA tensors: the fused kernels take bf16 only
    if backend == "flex":
        # fused only when traced into a compiled graph; eager calls (eval, CORE, engine) go to SDPA, unless a
        # test forces FlexAttention to compare its numerics
        return "flex" if compiling or forced else "sdpa"
    return "sdpa"


def dispatch(q: torch.Tensor) -> str:
    """The backend a call with query tensor `q` runs on here and now."""
    return route(_OVERRIDE or active().backend, cuda=q.is_cuda, dtype=q.dtype,
                 compiling=torch.compiler.is_compiling(), forced=_OVERRIDE is not None)


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
# SDPA path (docs/model.md#attention-backends)
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

# ---------------------------------------------------------------------------------------------
# FlexAttention path
# ---------------------------------------------------------------------------------------------

_BLOCK_MASKS: dict = {}


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


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """q: B x Tq x H x D, k/v: B x Tk x Hkv x D -> B x Tq x H x D. Always the plain `flex_attention`: inside
    the model's torch.compile it is traced into the graph and fused there. No module-level compiled handle:
    one first reached inside a trace ends up the raw function (dynamo ignores a nested compile), and one
    compiled eagerly recompiles per shape."""
    from torch.nn.attention.flex_attention import flex_attention

    Tq, Tk = q.size(1), k.size(1)
    gqa = q.size(2) != k.size(2)
    bm = _block_mask(Tq, Tk, left, right, q.device) if _needs_mask(left, right, Tq, Tk) else None
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return flex_attention(qt, kt, vt, block_mask=bm, enable_gqa=gqa).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# fused kernels
# ---------------------------------------------------------------------------------------------

def _fa3(q, k, v, causal: bool, window_size) -> torch.Tensor:
    out = _FUSED_MODULE.flash_attn_func(q, k, v, causal=causal, window_size=tuple(window_size))
    return out[0] if isinstance(out, tuple) else out


def _fa4_eager(q, k, v, left: int, right: int) -> torch.Tensor:
    window = (None if left < 0 else left, None if right < 0 else right)
    out = _FUSED_MODULE.flash_attn_func(q, k, v, causal=right == 0, window_size=window)
    return out[0] if isinstance(out, tuple) else out


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


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, 0),
) -> torch.Tensor:
    """Attention of q (B x Tq x H x D) over k, v (B x Tk x Hkv x D); returns B x Tq x H x D."""
    _check(q, k, v)
    backend = dispatch(q)
    if backend == "fa3":
        return _fa3(q, k, v, causal, window_size)
    left, right = _effective_window(causal, window_size)
    if backend == "fa4":
        return _FA4_CALL(q, k, v, left, right)
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
    cache_positions: list[int] | None = None,
) -> torch.Tensor:
    """Insert k, v (B x T_new x Hkv x D) into the caches (B x T_max x Hkv x D) in place at
    ``cache_seqlens`` (int32, shape (B,)) and attend q (B x T_new x H x D) over the first
    ``pos + T_new`` cached positions. Rows may sit at different positions (as in FA3): off FA3 such
    a batch writes each row at its own position and attends with a per-row mask (SDPA). Pass the
    positions on the host as ``cache_positions`` too: off FA3 they decide shapes, and reading them from
    the device would wait on the GPU twice per layer per token.
    """
    if dispatch(q) == "fa3" and hasattr(_FUSED_MODULE, "flash_attn_with_kvcache"):
        out = _FUSED_MODULE.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                                   causal=causal, window_size=tuple(window_size))
        return out[0] if isinstance(out, tuple) else out
    if (k is None) != (v is None):
        raise ValueError("pass both k and v, or neither")
    if cache_positions is not None:
        seqlens = list(cache_positions)
    elif cache_seqlens is not None:
        seqlens = cache_seqlens.tolist()  # a device read: callers that know the positions pass them
    else:
        seqlens = [0] * q.size(0)
    if len(seqlens) > 1 and any(p != seqlens[0] for p in seqlens):
        return _kvcache_ragged(q, k_cache, v_cache, k, v, seqlens, causal, window_size)
    pos = seqlens[0]
    t_new = k.size(1) if k is not None else 0
    if pos + t_new > k_cache.size(1):
        raise ValueError(f"KV cache overflow: {pos} + {t_new} > {k_cache.size(1)} slots")
    if k is not None:
        k_cache[:, pos:pos + t_new] = k
        v_cache[:, pos:pos + t_new] = v
    keys, values = k_cache[:, :pos + t_new], v_cache[:, :pos + t_new]
    _check(q, keys, values)
    left, right = _effective_window(causal, window_size)
    # Inference lengths change every step: SDPA here (no per-length block masks or recompiles); an explicit
    # "flex" override is honoured so the tests cover that path too.
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


def main(argv: list[str] | None = None) -> int:
    """`python -m ops.attention [--request fused]`: which backend this machine runs and why, as JSON; exit 1
    if the request cannot be met. Loading FA3 from the hub fills the Hugging Face cache, so running this once
    on a node with network (with HF_HOME on shared storage) readies air-gapped nodes (HF_HUB_OFFLINE=1)."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m ops.attention", description=main.__doc__.split("\n")[0])
    parser.add_argument("--request", default="auto", choices=REQUESTS)
    parser.add_argument("--device-type", default=None, choices=["cuda", "cpu", "mps"])
    args = parser.parse_args(argv)
    try:
        selection = configure(args.request, args.device_type)
    except AttentionUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({**selection.as_dict(), "device_type": selection.device_type}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
