"""Worker for tests/test_optim.py: runs MuonAdamW under torchrun (gloo on CPU) and saves what it saw.

    torchrun --standalone --nproc_per_node=2 tests/optim_dist_worker.py OUT_DIR

Every rank builds identical parameters, draws its OWN gradients (seeded by rank and step), steps
the optimizer, and writes OUT_DIR/rank{r}.pt with the initial parameters, its gradients, the final
parameters and whether a mid-run state_dict save/load resumed bit-exactly. The test replays the
same steps in one process with the mean gradient and compares.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.optim import MuonAdamW  # noqa: E402
from model.schedules import get_lr_multiplier  # noqa: E402

NUM_STEPS = 4
SAVE_AFTER = 2
# (kind, shapes): small AdamW (< 1024 elements: all_reduce), large AdamW (reduce_scatter on dim 0),
# Muon groups with K=3 (padding: rank 1 owns one of its two slots) and K=1 (rank 1 owns nothing).
LAYOUT = [
    ("adamw", [(48,), (8, 8)]),
    ("adamw", [(64, 32), (1024, 4)]),
    ("muon", [(32, 64)] * 3),
    ("muon", [(64, 32)]),
    ("muon", [(16, 16)] * 2),
]


def make_params(seed: int = 0) -> list[list[torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes] for _, shapes in LAYOUT]


def make_optimizer(params: list[list[torch.nn.Parameter]]) -> MuonAdamW:
    groups = []
    for (kind, _), ps in zip(LAYOUT, params):
        if kind == "adamw":
            groups.append(dict(kind="adamw", params=ps, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01))
        else:
            groups.append(dict(kind="muon", params=ps, lr=0.02, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0.1))
    return MuonAdamW(groups)


def make_grads(params: list[list[torch.nn.Parameter]], rank: int, step: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return [[torch.randn(p.shape, generator=gen) for p in ps] for ps in params]


def run_step(opt: MuonAdamW, params, grads, step: int) -> None:
    mult = get_lr_multiplier(step, NUM_STEPS, 1, 0.5, 0.1)
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * mult
    for ps, gs in zip(params, grads):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
    opt.step()
    opt.zero_grad(set_to_none=True)


def flat(params) -> list[torch.Tensor]:
    return [p.detach().clone() for ps in params for p in ps]


def main(out_dir: str) -> None:
    dist.init_process_group(backend="gloo")
    rank = dist.get_rank()
    params = make_params()
    init = flat(params)
    opt = make_optimizer(params)
    all_grads = [make_grads(params, rank, step) for step in range(NUM_STEPS)]
    saved = None
    for step in range(NUM_STEPS):
        if step == SAVE_AFTER:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            saved = (flat(params), buf.getvalue())
        run_step(opt, params, all_grads[step], step)
    final = flat(params)

    # Resume from the mid-run save into fresh parameters and a fresh optimizer.
    saved_params, saved_state = saved
    it = iter(saved_params)
    params2 = [[torch.nn.Parameter(next(it).clone()) for _ in ps] for ps in params]
    opt2 = make_optimizer(params2)
    opt2.load_state_dict(torch.load(io.BytesIO(saved_state), weights_only=True))
    for step in range(SAVE_AFTER, NUM_STEPS):
        run_step(opt2, params2, all_grads[step], step)
    resumed_equal = all(torch.equal(a, b) for a, b in zip(final, flat(params2)))

    grads_flat = [[g for gs in step_grads for g in gs] for step_grads in all_grads]
    torch.save(
        {"world": dist.get_world_size(), "init": init, "grads": grads_flat, "final": final, "resumed_equal": resumed_equal},
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
