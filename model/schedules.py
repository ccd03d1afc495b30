"""The training schedules by step (docs/model.md#learning-rate-schedule): the learning-rate multiplier, Muon's
momentum and the Muon weight decay. `it` runs 0 .. num_iterations - 1; model/train.py sets them on the
optimizer's groups before each step.
"""

from __future__ import annotations

import math


def _warmdown_steps(num_iterations: int, warmdown_ratio: float) -> int:
    return round(warmdown_ratio * num_iterations)


def get_lr_multiplier(it: int, num_iterations: int, warmup_steps: int, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Linear warmup to 1.0, constant, then linear warmdown to `final_lr_frac`."""
    warmdown = _warmdown_steps(num_iterations, warmdown_ratio)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def get_muon_momentum(it: int, num_iterations: int, warmdown_ratio: float, warmup_steps: int = 400) -> float:
    """0.85 -> 0.97 over the first `warmup_steps` steps, 0.97, then 0.97 -> 0.90 over the warmdown."""
    warmdown = _warmdown_steps(num_iterations, warmdown_ratio)
    if it < warmup_steps:
        return 0.85 + (0.97 - 0.85) * it / warmup_steps
    if warmdown > 0 and it >= num_iterations - warmdown:
        progress = (it - (num_iterations - warmdown)) / warmdown
        return 0.97 + (0.90 - 0.97) * progress
    return 0.97


def get_weight_decay(it: int, num_iterations: int, weight_decay_scaled: float) -> float:
    """Cosine decay of the Muon weight decay from `weight_decay_scaled` (it = 0) to 0 (it = N)."""
    return weight_decay_scaled * 0.5 * (1 + math.cos(math.pi * it / num_iterations))
