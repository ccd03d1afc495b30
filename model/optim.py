"""MuonAdamW: the speedrun's single optimizer (AdamW + Muon groups) and its distributed step.

Docs: docs/model.md#optimizer. One `torch.optim.Optimizer` holds parameter groups tagged
`kind="adamw"` (embeddings, lm_head, scalars) or `kind="muon"` (the 2-D matrices inside the
transformer blocks, one group per distinct shape). Every group gets `initial_lr` = its `lr` at
construction; the training loop sets `lr = initial_lr * get_lr_multiplier(...)` and the Muon
`momentum` / `weight_decay` from `get_muon_momentum` / `get_weight_decay` (model/schedules.py).

The update math of one AdamW parameter and one stack of same-shape Muon matrices is in
model/optim_steps.py. The two step functions are compiled when the optimizer is built with
`compile=True` (any device; the training entry points pass their own compile decision) or, by default,
on CUDA; where compiling fails they run eagerly, with one warning saying why.

Distributed scheme (ZeRO-2-style sharding, docs/model.md#distributed-step). When a process group
with world size W > 1 is initialised, `step()` averages the gradients itself (the model is not
wrapped in DDP): AdamW parameters with < 1024 elements are all_reduce(AVG)-ed and updated fully
on every rank (replicated state); larger AdamW parameters are reduce_scatter(AVG)-ed along dim 0
(dim 0 must divide by W), each rank updates its row slice (state sized like the slice) and the
slices are all_gather-ed back; a Muon group of K matrices is stacked into a ceil(K/W)*W buffer
(zero padding), reduce_scatter(AVG)-ed, each rank runs Muon on the matrices it owns and the
results are all_gather-ed and copied back. All collectives are async and overlap with compute.
Every op used (all_reduce / reduce_scatter_tensor / all_gather_into_tensor with ReduceOp.AVG)
is supported by gloo on CPU (checked on torch 2.13) and by NCCL. Optimizer state is therefore
sharded: `state_dict()` / `load_state_dict()` are per rank and a resume needs the same world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from model.common import dist_info
from model.optim_steps import POLAR_EXPRESS_COEFFS, StepFunction, adamw_step_fused, muon_step_fused

SMALL_PARAM_NUMEL = 1024  # AdamW params below this are all_reduced and updated whole on every rank

ADAMW_DEFAULTS = {"betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0}
MUON_DEFAULTS = {"momentum": 0.95, "ns_steps": 5, "beta2": 0.9, "weight_decay": 0.0}


def _use_bf16() -> bool:
    """True when the project-wide compute dtype (model.common.COMPUTE_DTYPE) is bf16 (read at each call)."""
    from model import common

    return common.COMPUTE_DTYPE == torch.bfloat16


# Prefer the torch 2.13 names; fall back to the older ones (torch 2.11/2.12).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ----------------------------------------------------------------------------------------------
# The optimizer


class MuonAdamW(torch.optim.Optimizer):
    """AdamW + Muon over kind-tagged parameter groups (see the module docstring and docs/model.md#optimizer)."""

    def __init__(self, param_groups: list[dict], compile: bool | None = None):
        """`compile`: compile the two step functions (True), run them eagerly (False), or None: compile on
        CUDA only (the parameters' device), the choice for callers that do not decide themselves."""
        groups = []
        for group in param_groups:
            group = dict(group)
            kind = group.get("kind")
            if kind == "adamw":
                defaults = ADAMW_DEFAULTS
            elif kind == "muon":
                defaults = MUON_DEFAULTS
            else:
                raise ValueError(f"param group kind must be 'adamw' or 'muon', got {kind!r}")
            if "lr" not in group:
                raise ValueError(f"{kind} param group needs an 'lr'")
            for key, value in defaults.items():
                group.setdefault(key, value)
            group["params"] = list(group["params"])
            if kind == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"a muon group needs same-shape 2-D params, got shapes {sorted(shapes)}")
                if not 1 <= int(group["ns_steps"]) <= len(POLAR_EXPRESS_COEFFS):
                    raise ValueError(f"ns_steps must be in 1..{len(POLAR_EXPRESS_COEFFS)}")
            groups.append(group)
        super().__init__(groups, {})
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
        if compile is None:
            compile = any(p.is_cuda for group in self.param_groups for p in group["params"])
        self.adamw_step = StepFunction(adamw_step_fused, compile)
        self.muon_step = StepFunction(muon_step_fused, compile)
        # 0-D CPU hyper-parameter tensors, refilled before every call (no recompiles on change).
        f32 = dict(dtype=torch.float32, device="cpu")
        self._step_t = torch.tensor(0.0, **f32)
        self._lr_t = torch.tensor(0.0, **f32)
        self._beta1_t = torch.tensor(0.0, **f32)
        self._beta2_t = torch.tensor(0.0, **f32)
        self._eps_t = torch.tensor(0.0, **f32)
        self._wd_t = torch.tensor(0.0, **f32)
        self._momentum_t = torch.tensor(0.0, **f32)

    # -- per-parameter / per-group updates ---------------------------------------------------

    def _adamw_update(self, group: dict, p: torch.Tensor, p_part: torch.Tensor, grad: torch.Tensor) -> None:
        """AdamW on `p_part` (all of `p` or this rank's row slice of it); state lives under `p`."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p_part)
            state["exp_avg_sq"] = torch.zeros_like(p_part)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        self._step_t.fill_(state["step"])
        self._lr_t.fill_(group["lr"])
        self._beta1_t.fill_(beta1)
        self._beta2_t.fill_(beta2)
        self._eps_t.fill_(group["eps"])
        self._wd_t.fill_(group["weight_decay"])
        self.adamw_step(p_part, grad, state["exp_avg"], state["exp_avg_sq"], self._step_t, self._lr_t,
                        self._beta1_t, self._beta2_t, self._eps_t, self._wd_t)

    def _muon_update(self, group: dict, stacked_params: torch.Tensor, stacked_grads: torch.Tensor, slots: int) -> None:
        """Muon on a stack of owned params; state (`slots` x ...) lives under the group's first param."""
        k, rows, cols = stacked_params.shape
        state = self.state[group["params"][0]]
        if not state:
            dtype, device = stacked_params.dtype, stacked_params.device
            state["momentum_buffer"] = torch.zeros(slots, rows, cols, dtype=dtype, device=device)
            s_shape = (slots, rows, 1) if rows >= cols else (slots, 1, cols)
            state["second_momentum_buffer"] = torch.zeros(s_shape, dtype=dtype, device=device)
        self._momentum_t.fill_(group["momentum"])
        self._lr_t.fill_(group["lr"])
        self._wd_t.fill_(group["weight_decay"])
        self._beta2_t.fill_(group["beta2"])
        self.muon_step(stacked_grads, stacked_params, state["momentum_buffer"][:k], state["second_momentum_buffer"][:k],
                       self._momentum_t, self._lr_t, self._wd_t, self._beta2_t, int(group["ns_steps"]), _use_bf16())

    # -- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = dist_info()
        if world == 1:
            self._step_local()
        else:
            self._step_distributed(rank, world)
        return loss

    def _step_local(self) -> None:
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p in group["params"]:
                    if p.grad is not None:
                        self._adamw_update(group, p, p, p.grad)
            else:
                params = group["params"]
                if all(p.grad is None for p in params):
                    continue
                grads = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
                stacked = torch.stack(params)
                self._muon_update(group, stacked, grads, len(params))
                for p, new in zip(params, stacked.unbind(0)):
                    p.copy_(new)

    def _step_distributed(self, rank: int, world: int) -> None:
        avg = dist.ReduceOp.AVG
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    raise RuntimeError("distributed MuonAdamW.step() needs a gradient for every parameter")

        # Phase 1: launch every gradient reduction, groups in order.
        reductions = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                entries = []
                for p in group["params"]:
                    grad = p.grad
                    if p.numel() < SMALL_PARAM_NUMEL:
                        work = dist.all_reduce(grad, op=avg, async_op=True)
                        entries.append((p, grad, work))
                    else:
                        if p.shape[0] % world != 0:
                            raise ValueError(f"AdamW param of shape {tuple(p.shape)}: dim 0 must divide by world size {world}")
                        rows = p.shape[0] // world
                        out = torch.empty((rows, *p.shape[1:]), dtype=grad.dtype, device=grad.device)
                        work = _reduce_scatter(out, grad.contiguous(), op=avg, async_op=True)
                        entries.append((p, out, work))
                reductions.append(entries)
            else:
                params = group["params"]
                k = len(params)
                chunk = -(-k // world)
                buf = params[0].grad.new_zeros((chunk * world, *params[0].shape))
                torch.stack([p.grad for p in params], out=buf[:k])
                out = buf.new_empty((chunk, *params[0].shape))
                work = _reduce_scatter(out, buf, op=avg, async_op=True)
                reductions.append((chunk, buf, out, work))

        # Phase 2: per group, wait for its reduction, update, launch the gather.
        gathers = []
        for group, red in zip(self.param_groups, reductions):
            if group["kind"] == "adamw":
                for p, grad, work in red:
                    work.wait()
                    if p.numel() < SMALL_PARAM_NUMEL:
                        self._adamw_update(group, p, p, grad)
                    else:
                        rows = p.shape[0] // world
                        part = p[rank * rows:(rank + 1) * rows]
                        self._adamw_update(group, p, part, grad)
                        gathers.append(_all_gather(p, part.clone(), async_op=True))
            else:
                chunk, buf, out, work = red
                work.wait()
                params = group["params"]
                start = rank * chunk
                owned = min(chunk, max(0, len(params) - start))
                send = out if out.dtype == params[0].dtype else out.new_empty(out.shape, dtype=params[0].dtype)
                if owned > 0:
                    stacked = torch.stack(params[start:start + owned])
                    self._muon_update(group, stacked, out[:owned], chunk)
                    send[:owned].copy_(stacked)
                send[owned:].zero_()
                if buf.dtype != send.dtype:
                    buf = buf.new_empty(buf.shape, dtype=send.dtype)
                gathers.append((params, buf, _all_gather(buf, send, async_op=True)))

        # Phase 3: wait for the gathers; copy gathered Muon stacks back into their params.
        for item in gathers:
            if isinstance(item, tuple):
                params, buf, work = item
                work.wait()
                for p, new in zip(params, buf.unbind(0)):
                    p.copy_(new)
            else:
                item.wait()
