"""The reference GPT of the speedrun (docs/model.md#architecture): modules, initialisation, forward, accounting, optimizer groups.

A decoder-only transformer with parameter-free RMSNorm, half-split RoPE (base 1e5) followed by QK-norm,
sliding-window causal attention (window pattern, e.g. SSSL, last layer always long), ReLU² MLP,
value embeddings mixed into v on alternating layers, "smear" bigram mixing of the token embeddings,
per-layer residual / x0 lambdas, a "backout" of the middle block's output, an untied lm_head and a
logit softcap of 15. No autocast: every matmul goes through `Linear`, which casts its fp32 master
weight to the activation dtype (model.common.COMPUTE_DTYPE); embeddings are stored in that dtype.

Build: `build_model(config, device, state_dict=None)` constructs on the meta device, then `to_empty` and
`init_weights()`, and loads a checkpoint's weights when given. Sizes must agree with model/sizing.py, whose
helpers are used here.

Inference (docs/inference.md#forward-with-a-cache): `forward(idx, kv_cache=cache)` runs a chunk of new tokens against a KV cache
(model/engine.py: KVCache) -- rotary positions and attention start at the cache position (per row when the
rows sit at different positions), smear continues from the cache's `prev_embedding`, and the cache
advances by T after the last layer. Without a cache the forward is exactly the training forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ops.attention import active as attention_backend
from ops.attention import flash_attn_func, flash_attn_with_kvcache
from ops.cpu_matmul import onednn_linear, onednn_linear_usable
from model.common import COMPUTE_DTYPE
from model.head_loss import head_cross_entropy
from model.selected_positions import block_at_positions, gather_positions
from model.sizing import (SMEAR_GATE_INPUTS, VE_GATE_INPUTS, padded_vocab, value_embedding_layers,
                          window_sizes)
from model.softcap import bounded_cross_entropy, softcap

ROPE_BASE = 100_000
ROPE_LENGTH_FACTOR = 10  # cos/sin are precomputed for 10 x sequence_len positions
QK_SCALE = 1.2
SOFTCAP = 15.0
VE_GATE_RANGE = 3.0  # ve gate = 3 * sigmoid(...)
ADAMW_EPS = 1e-10
MUON_MOMENTUM, MUON_NS_STEPS, MUON_BETA2 = 0.95, 5, 0.9
SMEAR_GROUP_LR = 0.2  # fixed: not scaled by batch size or model width


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

    def to_dict(self) -> dict:
        """What checkpoints store as `model_config`."""
        return asdict(self)


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, no learnable weight, default eps (the dtype's machine epsilon)."""
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """Bias-free linear layer whose fp32 master weight is cast to the input's dtype at every call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        assert not bias, "the model has no biases"
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """Nothing: GPT.init_weights initialises every weight (see Embedding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        if self.uses_onednn(x, weight):
            return onednn_linear(x.reshape(-1, x.size(-1)), weight).view(*x.shape[:-1], weight.size(0))
        return F.linear(x, weight)

    def uses_onednn(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """fp32 training on CPU: the GEMMs go through oneDNN where it is faster (docs/model.md#cpu-linear-layers).
        Not without autograd: evaluation and sampling call with a few rows, where oneDNN's per-call cost dominates."""
        return weight.requires_grad and torch.is_grad_enabled() and onednn_linear_usable(x, weight)


class VocabProjection(Linear):
    """The lm_head: a Linear that uses oneDNN for fp32 on CPU also without autograd (evaluation, sampling), where
    it is faster than MKL from a single row at a vocabulary's width (docs/model.md#cpu-linear-layers)."""

    def uses_onednn(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return onednn_linear_usable(x, weight)

    def fuses_training_loss(self, x: torch.Tensor) -> bool:
        """fp32 training on CPU: GPT.forward computes the loss with this projection in one autograd node
        (model/head_loss.py, docs/model.md#fused-head-loss)."""
        return super().uses_onednn(x, self.weight)  # Linear's rule: fp32 CPU training


class Embedding(nn.Embedding):
    """nn.Embedding without torch's default init: GPT.init_weights draws every weight, in the reference's order.

    The model is built on the meta device, where a default init computes nothing but still costs: torch's meta
    kernels for random fills import torch._dynamo on first use, about a second of the start of every process
    that builds a model and never compiles (evaluation, chat; tests/test_gpt.py checks it)."""

    def reset_parameters(self) -> None:
        pass


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on x (B, T, H, D) with cos/sin (1, T, 1, D/2): rotates each pair by -angle."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def rotary_tables(seq_len: int, head_dim: int, device, base: float = ROPE_BASE,
                  dtype: torch.dtype = COMPUTE_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of angle(t, j) = t * base^(-2j/D), shaped 1 x seq_len x 1 x D/2, in `dtype`."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(t, inv_freq)
    return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, has_ve: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        assert config.n_head % config.n_kv_head == 0, "n_kv_head must divide n_head (GQA)"
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate = Linear(VE_GATE_INPUTS, self.n_kv_head) if has_ve else None

    def queries(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated, normalised queries (B x T x H x D) of the normalised input u."""
        B, T, _ = u.shape
        return norm(apply_rotary_emb(self.c_q(u).view(B, T, self.n_head, self.head_dim), cos, sin)) * QK_SCALE

    def keys_values(self, u: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated, normalised keys and gated values (B x T x Hkv x D) of the normalised input u."""
        B, T, _ = u.shape
        k = self.c_k(u).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(u).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = VE_GATE_RANGE * torch.sigmoid(self.ve_gate(u[..., :VE_GATE_INPUTS]))  # B x T x Hkv
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        return norm(apply_rotary_emb(k, cos, sin)) * QK_SCALE, v

    def forward(self, u: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                window: int, kv_cache=None) -> torch.Tensor:
        B, T, _ = u.shape
        q = self.queries(u, cos, sin)
        k, v = self.keys_values(u, ve, cos, sin)
        if kv_cache is None:
            y = flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        else:  # write this chunk's k, v at the cache position(s) and attend over everything cached so far
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = flash_attn_with_kvcache(q, k_cache, v_cache, k=k.to(k_cache.dtype), v=v.to(v_cache.dtype),
                                        cache_seqlens=kv_cache.cache_seqlens, causal=True, window_size=(window, 0),
                                        cache_positions=kv_cache.positions)
        return self.c_proj(y.contiguous().view(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, has_ve: bool):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, has_ve)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window: int, kv_cache=None):
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C, V = config.n_embd, padded_vocab(config.vocab_size)
        self.padded_vocab_size = V
        attention_backend()  # choose the attention backend now (entry points choose it earlier), never in a trace
        self.window_sizes = window_sizes(config.n_layer, config.sequence_len, config.window_pattern)
        self.ve_layers = value_embedding_layers(config.n_layer)
        self.head_dim = C // config.n_head
        kv_dim = config.n_kv_head * self.head_dim
        self.transformer = nn.ModuleDict({
            "wte": Embedding(V, C),
            "h": nn.ModuleList(Block(config, i, i in self.ve_layers) for i in range(config.n_layer)),
        })
        self.lm_head = VocabProjection(C, V)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = Linear(SMEAR_GATE_INPUTS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({str(i): Embedding(V, kv_dim) for i in self.ve_layers})
        self.rotary_len = ROPE_LENGTH_FACTOR * config.sequence_len
        # allocated only: init_weights computes them on the model's device (build_model)
        tables = (1, self.rotary_len, 1, self.head_dim // 2)
        self.register_buffer("cos", torch.empty(tables, dtype=COMPUTE_DTYPE), persistent=False)
        self.register_buffer("sin", torch.empty(tables, dtype=COMPUTE_DTYPE), persistent=False)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor (docs/model.md#initialisation); RNG draws in the reference order: wte, lm_head, per block c_q c_k c_v c_fc,
        smear_gate, value embeds (ascending layer), ve_gates (ascending layer)."""
        C = self.config.n_embd
        s = math.sqrt(3) / math.sqrt(C)  # uniform bound with std 1/sqrt(C)
        embeddings = [self.transformer.wte, *self.value_embeds.values()]
        for emb in embeddings:  # (re-)initialise fp32 masters, cast at the end
            emb.to(dtype=torch.float32)
        self.transformer.wte.weight.normal_(0.0, 0.8)
        self.lm_head.weight.normal_(0.0, 0.001)
        for block in self.transformer.h:
            block.attn.c_q.weight.uniform_(-s, s)
            block.attn.c_k.weight.uniform_(-s, s)
            block.attn.c_v.weight.uniform_(-s, s)
            block.attn.c_proj.weight.zero_()
            block.mlp.c_fc.weight.uniform_(-0.4 * s, 0.4 * s)
            block.mlp.c_proj.weight.zero_()
        denom = max(self.config.n_layer - 1, 1)
        for i in range(self.config.n_layer):
            self.resid_lambdas[i] = 1.15 - 0.10 * i / denom
            self.x0_lambdas[i] = 0.20 - 0.15 * i / denom
        self.smear_lambda.fill_(0.0)
        self.backout_lambda.fill_(0.2)
        self.smear_gate.weight.uniform_(0.0, 0.02)
        for emb in self.value_embeds.values():
            emb.weight.uniform_(-s, s)
        for i in self.ve_layers:
            self.transformer.h[i].attn.ve_gate.weight.uniform_(0.0, 0.02)
        self.cos, self.sin = rotary_tables(self.rotary_len, self.head_dim, device=self.lm_head.weight.device)
        if COMPUTE_DTYPE != torch.float16:  # fp16 keeps fp32 embeddings (GradScaler cannot unscale fp16 grads)
            for emb in embeddings:
                emb.to(dtype=COMPUTE_DTYPE)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    # --------------------------------------------------------------- forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                kv_cache=None):
        """Logits (B x T x vocab, fp32) without targets; else the cross-entropy (ignore_index -1),
        a scalar for reduction 'mean' or the B*T per-token losses for 'none'. In fp32 training on CPU the
        loss comes from model/head_loss.py (the lm_head, softcap and loss as one autograd node).

        With `kv_cache` (model/engine.py: KVCache) idx holds the next T tokens of every row: positions,
        attention and smear continue from what the cache holds, and the cache advances by T.
        """
        hidden = self.hidden_states(idx, kv_cache)
        if targets is not None and self.lm_head.fuses_training_loss(hidden):
            return head_cross_entropy(hidden.reshape(-1, hidden.size(-1)), self.lm_head.weight[:self.config.vocab_size],
                                      targets.reshape(-1), SOFTCAP, ignore_index=-1, reduction=loss_reduction)
        logits = self.logits(hidden)
        if targets is None:
            return logits
        return bounded_cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), bound=SOFTCAP,
                                     ignore_index=-1, reduction=loss_reduction)

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """The normalised token embeddings the blocks start from (before smear), in COMPUTE_DTYPE."""
        return norm(self.transformer.wte(idx).to(COMPUTE_DTYPE))

    def hidden_states(self, idx: torch.Tensor, kv_cache=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states (B x T x n_embd) that `logits` projects; with `kv_cache` as in
        `forward`. Scoring a few positions (CORE) or filling a cache needs no projection of the others.
        `positions` (B x S int64, within this chunk): only those rows' states, B x S x n_embd; the last block
        then runs its query side only there (model/selected_positions.py); S = 0 only fills the cache."""
        B, T = idx.shape
        if kv_cache is None:
            assert T <= self.cos.size(1), f"sequence length {T} exceeds the rotary cache ({self.cos.size(1)})"
            cos, sin = self.cos[:, :T], self.sin[:, :T]
        else:
            cos, sin = self._cached_rotary(kv_cache, B, T)

        x = self.embed_tokens(idx)
        if kv_cache is not None:
            x = self._cached_smear(x, kv_cache)
        elif T > 1:  # smear: x_t += smear_lambda * sigmoid(smear_gate(x_t[:24])) * x_{t-1} (un-smeared), t >= 1
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_GATE_INPUTS]))
            x = torch.cat((x[:, :1], x[:, 1:] + gate * x[:, :-1]), dim=1)
        x0 = x
        backout_layer = self.config.n_layer // 2
        x_backout = None
        last = self.config.n_layer - 1 if positions is not None else None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            if i == last:
                x = block_at_positions(block, x, ve, cos, sin, self.window_sizes[i], positions, kv_cache)
                x_backout = None if x_backout is None else gather_positions(x_backout, positions)
            else:
                x = block(x, ve, cos, sin, self.window_sizes[i], kv_cache)
            if i == backout_layer:
                x_backout = x
        if kv_cache is not None:  # every layer has written its k, v: the new tokens are now in the cache
            kv_cache.advance(T)
        x = x - self.backout_lambda.to(x.dtype) * x_backout
        return norm(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the real vocabulary (padding sliced off first), soft-capped at SOFTCAP."""
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        return softcap(logits, SOFTCAP)

    def _cached_rotary(self, kv_cache, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions pos .. pos+T-1, pos = the cache position (of each row when rows differ)."""
        positions = kv_cache.positions  # host-side copy of cache_seqlens: no device sync per step
        end = max(positions) + T
        assert end <= self.cos.size(1), f"position {end} exceeds the rotary cache ({self.cos.size(1)})"
        if kv_cache.uniform:
            p = positions[0]
            return self.cos[:, p:p + T], self.sin[:, p:p + T]
        assert len(positions) == B, f"the cache holds {len(positions)} rows but idx has {B}"
        index = torch.tensor(positions, device=self.cos.device).unsqueeze(1) + torch.arange(T, device=self.cos.device)
        return self.cos[0, index], self.sin[0, index]  # B x T x 1 x D/2

    def _cached_smear(self, x: torch.Tensor, kv_cache) -> torch.Tensor:
        """Smear of a chunk that continues the cached sequence: the same per-position mixing as the
        uncached forward, x'_t = x_t + g_t * x_{t-1}, where x_{-1} of the chunk is the last (un-smeared)
        embedding of the previous call. The first chunk of a sequence has none: its position 0 is untouched,
        as in training. A later chunk -- a decode step or a second prefill chunk -- smears its first position
        with it, so chunked prefill and token-by-token decode equal one uncached forward."""
        prev = kv_cache.prev_embedding
        kv_cache.prev_embedding = x[:, -1:].detach().clone()
        if prev is None:
            if x.size(1) == 1:
                return x
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_GATE_INPUTS]))
            return torch.cat((x[:, :1], x[:, 1:] + gate * x[:, :-1]), dim=1)
        shifted = torch.cat((prev.to(x.dtype).expand(x.size(0), 1, x.size(2)), x[:, :-1]), dim=1)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_GATE_INPUTS]))
        return x + gate * shifted

    # ------------------------------------------------------------ accounting
    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts by group (docs/model.md#parameter-and-flop-accounting); the groups sum to the total (asserted)."""
        def count(params) -> int:
            return sum(p.numel() for p in params)
        counts = {
            "wte": count(self.transformer.wte.parameters()),
            "value_embeds": count(self.value_embeds.parameters()),
            "lm_head": count(self.lm_head.parameters()),
            "transformer_matrices": count(self.transformer.h.parameters()),
            "scalars": count([self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                              self.smear_lambda, self.backout_lambda]),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == count(self.parameters()), "parameter groups do not cover the model"
        return counts

    def num_matmul_params(self) -> int:
        """Elements of every linear weight (blocks incl. ve_gates, lm_head, smear_gate)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def estimate_flops(self) -> int:
        """Training FLOPs per token (fwd+bwd): 6 x matmul params + 12*H*D*min(window, T) per layer."""
        T, hd = self.config.sequence_len, self.config.n_head * self.head_dim
        attention = sum(12 * hd * min(w, T) for w in self.window_sizes)
        return 6 * self.num_matmul_params() + attention

    def estimate_decode_flops(self, context: int) -> int:
        """FLOPs to decode one token at context length `context`."""
        hd = self.config.n_head * self.head_dim
        return 2 * self.num_matmul_params() + sum(4 * hd * min(context, w) for w in self.window_sizes)

    def estimate_prefill_flops(self, n: int) -> int:
        """FLOPs to prefill n tokens."""
        hd = self.config.n_head * self.head_dim
        attention = 0
        for window in self.window_sizes:
            w = min(window, n)
            attention += 4 * hd * (w * (w + 1) // 2 + (n - w) * w)
        return 2 * self.num_matmul_params() * n + attention

    # ------------------------------------------------------------- optimizer
    def optimizer_groups(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                         weight_decay: float = 0.0, scalar_lr: float = 0.5) -> list[dict]:
        """The MuonAdamW parameter groups (docs/model.md#parameter-groups): six AdamW groups in order, then one Muon group
        per distinct block-parameter shape (ascending shape, parameters in registration order)."""
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5

        def adamw(params, lr, betas, wd):
            return {"kind": "adamw", "params": list(params), "lr": lr, "betas": betas, "eps": ADAMW_EPS,
                    "weight_decay": wd}

        groups = [
            adamw([self.lm_head.weight], unembedding_lr * dmodel_lr_scale, (0.8, 0.96), 0.01),
            adamw([self.transformer.wte.weight], embedding_lr * dmodel_lr_scale, (0.8, 0.995), 0.001),
            adamw(self.value_embeds.parameters(), embedding_lr * dmodel_lr_scale * 0.5, (0.8, 0.995), 0.01),
            adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            adamw([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], SMEAR_GROUP_LR, (0.8, 0.95), 0.0),
        ]
        by_shape: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for p in self.transformer.h.parameters():
            by_shape.setdefault(tuple(p.shape), []).append(p)
        for shape in sorted(by_shape):
            groups.append({"kind": "muon", "params": by_shape[shape], "lr": matrix_lr, "momentum": MUON_MOMENTUM,
                           "ns_steps": MUON_NS_STEPS, "beta2": MUON_BETA2, "weight_decay": weight_decay})

        seen = [id(p) for g in groups for p in g["params"]]
        assert len(seen) == len(set(seen)), "a parameter is in more than one optimizer group"
        assert set(seen) == {id(p) for p in self.parameters()}, "optimizer groups do not cover every parameter"
        return groups

    def setup_optimizer(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                        weight_decay: float = 0.0, scalar_lr: float = 0.5, compile: bool | None = None):
        """MuonAdamW over optimizer_groups(...); every group gets initial_lr = lr. `compile`: compile the
        optimizer's step functions (None: on CUDA only; the training scripts pass their --compile decision)."""
        from model.optim import MuonAdamW  # imported here: the optimizer module is optional for the model

        optimizer = MuonAdamW(self.optimizer_groups(unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                                    matrix_lr=matrix_lr, weight_decay=weight_decay,
                                                    scalar_lr=scalar_lr), compile=compile)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        return optimizer

    # ------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[int]:
        """Naive sampler (docs/inference.md#naive-sampler): batch 1, full forward each step, yields one token id per step."""
        assert isinstance(tokens, list) and tokens, "tokens must be a non-empty list of ids"
        assert temperature >= 0, "temperature must be >= 0"
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()


def build_model(config: GPTConfig, device: torch.device | str, state_dict: dict | None = None) -> GPT:
    """Construct on the meta device, materialise on `device`, initialise (docs/model.md#initialisation), then load `state_dict`
    strictly when given (a checkpoint's weights, assigned in place). The one way the project builds a model:
    the trainers, model/checkpoint.py's load_model, tests and benches. init_weights runs either way: it
    materialises the rotary buffers, which checkpoints do not hold, and draws from the RNG as a fresh run does."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True, assign=True)
    return model
