"""MuonAdamW: the speedrun's single optimizer (AdamW + Muon groups), its distributed step and schedules.

Docs: docs/model.md#optimizer. One `torch.optim.Optimizer` holds parameter groups tagged
`kind="adamw"` (embeddings, lm_head, scalars) or `kind="muon"` (the 2-D matrices inside the
transformer blocks, one group per distinct shape). Every group gets `initial_lr` = its `lr` at
construction; the training loop sets `lr = initial_lr * get_lr_multiplier(...)` and the Muon
`momentum` / `weight_decay` from `get_muon_momentum` / `get_weight_decay`.

Numerics (docs/model.md#adamw, docs/model.md#muon): AdamW works in fp32 (decoupled weight decay before the update, bias
corrections) and writes results back in the storage dtype of parameter and state. Muon works on
the stack (K x r x c) of a group's same-shape matrices: Nesterov momentum, optional bf16 cast
(when `model.common.COMPUTE_DTYPE` is bf16), MuonEq row equilibration, Polar Express
orthogonalisation, Muon+ renormalisation, NorMuon variance reduction and cautious weight decay
with the tall-matrix learning-rate boost. Hyper-parameters reach the step functions as 0-D CPU
tensors so that schedule changes never recompile. The two step functions are compiled with
`torch.compile(fullgraph=True, dynamic=False)` when the optimizer is built with `compile=True` (any
device; the training entry points pass their own compile decision) or, by default, on CUDA. Where
compiling fails (no C++ compiler for inductor on CPU, an unsupported Python), the optimizer says why
once and runs the same functions eagerly.

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

import math
import warnings

import torch
import torch.distributed as dist

from model.common import dist_info

# Polar Express coefficients (a, b, c) per iteration (Amsel et al., arXiv 2505.16932;
# num_iters=5, safety 2e-2, cushion 2).
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

SMALL_PARAM_NUMEL = 1024  # AdamW params below this are all_reduced and updated whole on every rank

ADAMW_DEFAULTS = {"betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0}
MUON_DEFAULTS = {"momentum": 0.95, "ns_steps": 5, "beta2": 0.9, "weight_decay": 0.0}


# ----------------------------------------------------------------------------------------------
# Step functions (pure tensor code; compiled or eager, see StepFunction)


def adamw_step_fused(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t) -> None:
    """One AdamW update of `p` (docs/model.md#adamw), in place. Arithmetic in fp32, results stored in the
    dtypes of `p`, `exp_avg`, `exp_avg_sq`. `step_t` is the step number after incrementing (>= 1)."""
    pf = p.float()
    g = grad.float()
    m = exp_avg.float()
    v = exp_avg_sq.float()
    pf = pf * (1 - lr_t * wd_t)
    m = m + (1 - beta1_t) * (g - m)
    v = v + (1 - beta2_t) * (g * g - v)
    bias1 = 1 - beta1_t**step_t
    bias2 = 1 - beta2_t**step_t
    pf = pf - (lr_t / bias1) * m / (torch.sqrt(v / bias2) + eps_t)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    p.copy_(pf)


def muon_lr_scale(rows: int, cols: int) -> float:
    """Muon's shape-dependent LR factor: sqrt(max(1, r/c)) (2.0 for a 4C x C matrix)."""
    return math.sqrt(max(1.0, rows / cols))


def muon_reduction_dim(rows: int, cols: int) -> int:
    """NorMuon reduces over columns (per-row statistics) when r >= c, else over rows."""
    return -1 if rows >= cols else -2


def muon_equilibrate(u: torch.Tensor) -> torch.Tensor:
    """MuonEq: rescale every row of every matrix to the same L2 norm ||U||_F / sqrt(r).
    Norms are computed in fp32; the result keeps the dtype of `u`."""
    uf = u.float()
    rows = u.size(-2)
    target = uf.norm(dim=(-2, -1), keepdim=True) / math.sqrt(rows)
    row_norm = uf.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return u * (target / row_norm).to(u.dtype)


def polar_express(u: torch.Tensor, ns_steps: int) -> torch.Tensor:
    """Normalise (||U||_F * 1.01 + 1e-6) then run `ns_steps` Polar Express iterations on a stack of
    matrices (K x r x c); returns an approximately semi-orthogonal stack in the dtype of `u`."""
    x = u / (u.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    wide = u.size(-2) <= u.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if wide:
            gram = x @ x.mT
            poly = b * gram + c * (gram @ gram)
            x = a * x + poly @ x
        else:
            gram = x.mT @ x
            poly = b * gram + c * (gram @ gram)
            x = a * x + x @ poly
    return x


def normuon(o: torch.Tensor, second_moment: torch.Tensor, beta2_t, red_dim: int) -> torch.Tensor:
    """NorMuon variance reduction (arXiv 2510.05491). Updates `second_moment` (K x r x 1 when
    red_dim == -1, K x 1 x c when red_dim == -2) in place and returns O rescaled per row/column
    with its Frobenius norm preserved (computed in fp32, returned in the dtype of `o`)."""
    of = o.float()
    n = o.size(red_dim)
    q = of.square().mean(dim=red_dim, keepdim=True)
    norm0 = (q * n).sum(dim=(-2, -1), keepdim=True).sqrt()
    s_buf = second_moment.float()
    s_buf = s_buf + (1 - beta2_t) * (q - s_buf)
    second_moment.copy_(s_buf)
    scale = torch.rsqrt(s_buf.clamp_min(1e-10))
    norm1 = (q * n * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return (of * (scale * norm0 / norm1.clamp_min(1e-10))).to(o.dtype)


def muon_step_fused(
    grads, params, momentum_buf, second_buf, momentum_t, lr_t, wd_t, beta2_t, ns_steps: int, use_bf16: bool
) -> None:
    """One Muon update (docs/model.md#muon) of a stack `params` (K x r x c), in place.
    `momentum_buf` (K x r x c) and `second_buf` (K x r x 1 or K x 1 x c) are updated in place."""
    rows, cols = params.size(-2), params.size(-1)
    # 1. Nesterov momentum (lerp form)
    g = grads.float()
    m = momentum_buf.float()
    m = m + (1 - momentum_t) * (g - m)
    momentum_buf.copy_(m)
    u = g + momentum_t * (m - g)
    # 2. optional bf16 compute
    if use_bf16:
        u = u.to(torch.bfloat16)
    # 3. MuonEq, 4.-5. normalise + Polar Express, 6. back to the parameter dtype
    u = muon_equilibrate(u)
    o = polar_express(u, ns_steps).to(params.dtype)
    # 7. Muon+ renormalisation to sqrt(min(r, c))
    o = o * (math.sqrt(min(rows, cols)) / o.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    # 8. NorMuon
    o = normuon(o, second_buf, beta2_t, muon_reduction_dim(rows, cols))
    # 9. cautious weight decay + update with the tall-matrix LR boost
    lr_eff = lr_t * muon_lr_scale(rows, cols)
    of = o.float()
    pf = params.float()
    mask = (of * pf) >= 0
    pf = pf - lr_eff * of - (lr_eff * wd_t) * pf * mask
    params.copy_(pf)


def _raise_recompile_limit() -> None:
    # One graph per distinct (shape, dtype) of the inputs: a GPT has ~8 AdamW shapes plus its Muon
    # shapes, more than dynamo's default limit of 8 recompiles per function, so raise it.
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this function cannot be compiled here", raised before anything runs."""
    import torch._dynamo.exc as dynamo_exc

    errors = [dynamo_exc.BackendCompilerFailed, dynamo_exc.Unsupported]
    try:
        from torch._inductor.exc import InductorError, InvalidCxxCompiler

        errors += [InductorError, InvalidCxxCompiler]
    except ImportError:  # older torch: these surface as BackendCompilerFailed
        pass
    return tuple(errors)


class StepFunction:
    """A step function, compiled on first use when asked; eager (with one warning saying why) when
    compiling is impossible here. Compile errors are raised before the graph runs, so falling back never
    applies an update twice."""

    def __init__(self, fn, compile: bool):
        self.fn = fn
        self.compiled = None
        self.fallback_reason: str | None = None
        if compile:
            if not hasattr(torch, "compile"):
                self.fallback_reason = "this torch has no torch.compile"
            else:
                _raise_recompile_limit()
                self.compiled = torch.compile(fn, fullgraph=True, dynamic=False)

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args):
        if self.compiled is None:
            return self.fn(*args)
        try:
            return self.compiled(*args)
        except _compile_errors() as exc:
            self.compiled = None
            self.fallback_reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            warnings.warn(f"MuonAdamW: torch.compile of {self.fn.__name__} failed, running it eagerly "
                          f"({self.fallback_reason})", RuntimeWarning, stacklevel=2)
            return self.fn(*args)


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


# ----------------------------------------------------------------------------------------------
# Schedules (docs/model.md#learning-rate-schedule); `it` runs 0 .. num_iterations - 1


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
