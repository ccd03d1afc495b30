"""Model sizing and training-horizon arithmetic derived from `--depth` (docs/model.md#sizes-from-depth, docs/model.md#training-plan).

Pure Python, no torch: the config layer (tasks/config.py) uses it to validate a run and show its
plan before any stage starts, and model/train.py uses the same functions so the two can never
disagree. model/gpt.py counts parameters from the real modules; its tests compare against this.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

B_REF = 2**19  # tokens per optimizer step that is optimal at d12
VOCAB_PAD = 64  # embedding / lm_head rows are padded to a multiple of this
SMEAR_GATE_INPUTS = 24  # smear_gate is a 1 x 24 Linear
VE_GATE_INPUTS = 12  # ve_gate is a n_kv_head x 12 Linear
REFERENCE_DEPTH = 12  # D_REF / N_REF are taken at d12


def model_dim(depth: int, aspect_ratio: int, head_dim: int) -> int:
    """depth * aspect_ratio nudged up to a multiple of head_dim."""
    return math.ceil(depth * aspect_ratio / head_dim) * head_dim


def padded_vocab(vocab_size: int) -> int:
    return math.ceil(vocab_size / VOCAB_PAD) * VOCAB_PAD


def short_window(seq_len: int) -> int:
    """A quarter of the context rounded up to a multiple of 128 (512 for T=2048)."""
    return 128 * math.ceil(math.ceil(seq_len / 4) / 128)


def window_sizes(n_layer: int, seq_len: int, pattern: str) -> list[int]:
    """Left window per layer: L -> seq_len, S -> short_window; the last layer is always L."""
    pattern = pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"window pattern must be made of S and L, got {pattern!r}")
    windows = [seq_len if pattern[i % len(pattern)] == "L" else short_window(seq_len) for i in range(n_layer)]
    windows[-1] = seq_len
    return windows


def value_embedding_layers(n_layer: int) -> list[int]:
    """Alternating layers, always including the last one."""
    return [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]


@dataclass(frozen=True)
class ModelShape:
    depth: int
    model_dim: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    seq_len: int
    window_pattern: str

    @classmethod
    def from_depth(cls, depth: int, *, aspect_ratio: int = 64, head_dim: int = 128, vocab_size: int = 32768,
                   seq_len: int = 2048, window_pattern: str = "SSSL") -> "ModelShape":
        dim = model_dim(depth, aspect_ratio, head_dim)
        n_head = dim // head_dim
        return cls(depth, dim, n_head, n_head, head_dim, vocab_size, seq_len, window_pattern.upper())

    def param_counts(self) -> dict[str, int]:
        """Parameter groups as GPT.num_scaling_params reports them."""
        C, V = self.model_dim, padded_vocab(self.vocab_size)
        n_ve = len(value_embedding_layers(self.depth))
        counts = {
            "wte": V * C,
            "value_embeds": n_ve * V * self.n_kv_head * self.head_dim,
            "lm_head": V * C,
            "transformer_matrices": self.depth * 12 * C * C + n_ve * VE_GATE_INPUTS * self.n_kv_head,
            "scalars": 2 * self.depth + SMEAR_GATE_INPUTS + 2,
        }
        counts["total"] = sum(counts.values())
        return counts

    def scaling_params(self) -> int:
        """transformer matrices + lm_head: the N of the tokens:params horizon."""
        c = self.param_counts()
        return c["transformer_matrices"] + c["lm_head"]

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 x matmul params + the windowed attention term."""
        matmul_params = self.scaling_params() + SMEAR_GATE_INPUTS
        attention = sum(12 * self.n_head * self.head_dim * min(w, self.seq_len)
                        for w in window_sizes(self.depth, self.seq_len, self.window_pattern))
        return 6 * matmul_params + attention


@dataclass(frozen=True)
class TrainingPlan:
    """Everything base training derives from depth and the horizon options (docs/model.md#training-plan)."""

    model_dim: int
    n_head: int
    n_layer: int
    vocab_size: int
    total_params: int
    scaling_params: int
    flops_per_token: int
    target_tokens: int
    total_batch_size: int
    device_batch_size: int
    world_size: int
    grad_accum_steps: int
    num_iterations: int
    total_tokens: int
    total_flops: float
    tokens_per_param: float
    batch_lr_scale: float
    weight_decay_scaled: float
    warmdown_steps: int

    def as_dict(self) -> dict:
        return asdict(self)


class PlanError(ValueError):
    """The horizon/batch options cannot produce a run; the message names the option and the fix."""


def plan_training(*, depth: int, aspect_ratio: int, head_dim: int, max_seq_len: int, window_pattern: str,
                  vocab_size: int, device_batch_size: int, total_batch_size: int, world_size: int,
                  num_iterations: int, target_flops: float, target_param_data_ratio: float,
                  weight_decay: float, warmdown_ratio: float) -> TrainingPlan:
    shape_args = dict(aspect_ratio=aspect_ratio, head_dim=head_dim, vocab_size=vocab_size,
                      seq_len=max_seq_len, window_pattern=window_pattern)
    shape = ModelShape.from_depth(depth, **shape_args)
    n_params = shape.scaling_params()
    n_ref = ModelShape.from_depth(REFERENCE_DEPTH, **shape_args).scaling_params()
    flops_per_token = shape.flops_per_token()

    # With ratio <= 0 the horizon comes from elsewhere; batch and WD scaling only depend on N/N_ref.
    ratio = target_param_data_ratio if target_param_data_ratio > 0 else 1.0
    target_tokens = int(ratio * n_params)
    d_ref = ratio * n_ref
    if total_batch_size == -1:
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** 0.383))

    tokens_per_fwdbwd = device_batch_size * max_seq_len * world_size
    if total_batch_size % tokens_per_fwdbwd:
        raise PlanError(
            f"pretrain.total_batch_size={total_batch_size} is not divisible by device_batch_size x max_seq_len x "
            f"world_size = {device_batch_size} x {max_seq_len} x {world_size} = {tokens_per_fwdbwd}; "
            f"fix: set pretrain.total_batch_size to a multiple of {tokens_per_fwdbwd} or lower pretrain.device_batch_size")
    grad_accum_steps = total_batch_size // tokens_per_fwdbwd

    if num_iterations > 0:
        steps = num_iterations
    elif target_flops > 0:
        steps = round(target_flops / (flops_per_token * total_batch_size))
    elif target_param_data_ratio > 0:
        steps = target_tokens // total_batch_size
    else:
        raise PlanError("no training horizon: pretrain.num_iterations, pretrain.target_flops and "
                        "pretrain.target_param_data_ratio are all <= 0; fix: set one of them, "
                        "e.g. --set pretrain.target_param_data_ratio=12")
    if steps < 1:
        raise PlanError(f"the horizon gives {steps} optimizer steps (total batch {total_batch_size} tokens); "
                        "fix: raise pretrain.target_param_data_ratio / pretrain.target_flops, "
                        "or set pretrain.num_iterations")

    total_tokens = total_batch_size * steps
    return TrainingPlan(
        model_dim=shape.model_dim, n_head=shape.n_head, n_layer=depth, vocab_size=vocab_size,
        total_params=shape.param_counts()["total"], scaling_params=n_params, flops_per_token=flops_per_token,
        target_tokens=target_tokens, total_batch_size=total_batch_size, device_batch_size=device_batch_size,
        world_size=world_size, grad_accum_steps=grad_accum_steps, num_iterations=steps,
        total_tokens=total_tokens, total_flops=float(flops_per_token) * total_tokens,
        tokens_per_param=total_tokens / n_params,
        batch_lr_scale=math.sqrt(total_batch_size / B_REF),
        weight_decay_scaled=weight_decay * math.sqrt(total_batch_size / B_REF) * (d_ref / target_tokens),
        warmdown_steps=round(warmdown_ratio * steps),
    )
