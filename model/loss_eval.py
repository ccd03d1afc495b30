"""Bits per byte: the vocabulary-independent validation loss (docs/evaluation.md#bits-per-byte).

Each target token's cross-entropy (nats) is weighted by whether it has raw bytes: special tokens
(BOS as a target) and ignored targets (-1) count neither loss nor bytes. Totals are summed across
ranks before dividing, so every rank returns the same number.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable, steps: int, token_bytes: torch.Tensor) -> float:
    """bpb = sum(nats over targets with bytes) / (ln 2 * sum(bytes)) over `steps` (x, y) batches."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        x, y = next(batch_iter)
        loss = model(x, y, loss_reduction="none").view(-1).double()
        targets = y.view(-1)
        valid = targets >= 0
        nbytes = torch.where(valid, token_bytes[targets.clamp(min=0)], torch.zeros_like(targets, dtype=token_bytes.dtype))
        total_nats += (loss * (nbytes > 0)).sum()
        total_bytes += nbytes.sum().to(torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    n_bytes = total_bytes.item()
    return float("inf") if n_bytes == 0 else total_nats.item() / (math.log(2) * n_bytes)
