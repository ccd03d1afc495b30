"""The first thing to run on a GPU: environment, numerics and speed of every CUDA path, as one JSON.

    PYTHONPATH=. python bench/gpu_check.py --tokenizer-dir TOK --data-dir SHARDS      # one GPU, <= 8 min
    PYTHONPATH=. python bench/gpu_check.py --tokenizer-dir TOK --data-dir SHARDS --cpu   # tiny sizes, CPU (CI)

TOK is a tokenizer directory (tokenizer.tiktoken, tokenizer.json, token_bytes.pt: a tokenizer artifact),
SHARDS a directory of shard_*.parquet (the last one is used as validation text) or a shards artifact.
Nothing else is needed: no Prefect, no rustbpe, no network, no CORE bundle (the CORE timing uses
CORE-shaped tasks built from the shards' text by the same evaluator).

Checks (each one an entry of "checks" with "ok"; the script exits 1 if any is not ok):

- environment: GPU name and capability, torch/triton/CUDA versions, compute dtype, the attention backend
  the model uses and why the better ones were not chosen.
- gpt_fp32 (a child process with SPEEDRUN_DTYPE=float32, TF32 off) and gpt_bf16: one forward and backward
  of a small GPT on CUDA against the same weights on CPU: loss, logits and gradients, tight in fp32 and
  loose in bf16.
- attention: every available backend (fa3, fa4, flex, sdpa) against SDPA with a sliding window and with
  full causal attention, forward and backward (atol=rtol=1e-2 outputs, 5e-2 gradients), and a
  d12-shaped forward+backward timing of each (FlexAttention compiled, as the model runs it).
- fp8_linear: FP8 tensorwise linear against the bf16 one, forward and both gradients (relative error
  < 0.08 forward, < 0.12 gradients, the bounds of tests/test_fp8.py).
- engine_greedy: KV-cache engine greedy tokens against the naive full-sequence greedy decode (a
  divergence only counts as a failure if the full forward's top-2 logits there are not a near-tie).
- train_speed: d12 pretraining steps on the shards with torch.compile, bf16 then FP8: tok/s, bf16 MFU,
  first-step compile seconds, FP8/bf16 throughput ratio, finite losses; on a fused attention backend also
  bf16 on FlexAttention, for the fused/flex tok/s ratio.
- core_speed: CORE evaluation by prefix sharing, batching and one item at a time (model/core_scoring.py) on
  the trained d12: examples/s each, and identical decisions.
- engine_speed: decode tokens/s of the engine at batch 1 and batch 8.

--cpu runs the same checks at tiny sizes on CPU, without torch.compile (which takes minutes there), so that
the test suite runs this script and it cannot rot. CPU-vs-CUDA comparisons then compare CPU with itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/gpu_check.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ops import attention as attn  # noqa: E402
from model.common import COMPUTE_DTYPE, get_peak_flops  # noqa: E402
from model.gpt import GPTConfig, build_model  # noqa: E402

# Sizes per mode. GPU: a d12 at the reference's T=2048; CPU: tiny, seconds per check.
SIZES = {
    "cuda": dict(small_layers=4, small_embd=256, small_heads=2, small_seq=256, attn_batch=4, attn_seq=1024,
                 attn_heads=8, attn_dim=128, attn_window=256, time_batch=16, time_seq=2048, time_heads=6,
                 fp8_rows=8192, fp8_in=1536, fp8_out=6144, train_depth=12, train_seq=2048, train_batch=16,
                 train_steps=25, core_items=48, engine_tokens=128, compile=True),
    "cpu": dict(small_layers=2, small_embd=64, small_heads=2, small_seq=64, attn_batch=1, attn_seq=128,
                attn_heads=2, attn_dim=32, attn_window=32, time_batch=1, time_seq=128, time_heads=2,
                fp8_rows=64, fp8_in=128, fp8_out=256, train_depth=1, train_seq=64, train_batch=2,
                train_steps=3, core_items=8, engine_tokens=12, compile=False),
}
TIMED_FROM_STEP = 5  # training steps before this one (compile, warm-up) are not timed


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer-dir", type=Path, required=True, help="a tokenizer artifact directory")
    p.add_argument("--data-dir", type=Path, required=True, help="shard_*.parquet directory or shards artifact")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on CPU, no compile (the test suite runs this)")
    p.add_argument("--only", default="", help="comma list of checks to run (default: all)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- helpers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against the reference b, in fp32."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def small_gpt(sizes: dict, vocab_size: int, device, seed: int = 0):
    """A small GPT whose every path matters (zero-initialised projections perturbed, smear and backout on)."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sizes["small_seq"], vocab_size=vocab_size, n_layer=sizes["small_layers"],
                       n_head=sizes["small_heads"], n_kv_head=sizes["small_heads"], n_embd=sizes["small_embd"],
                       window_pattern="SL")
    model = build_model(config, "cpu")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((torch.randn(p.shape, generator=g) * (0.5 if name == "lm_head.weight" else 0.05)).to(p.dtype))
        model.smear_lambda.fill_(0.5)
        model.backout_lambda.fill_(0.3)
    return model.to(device) if torch.device(device).type != "cpu" else model


def val_texts(data_dir: Path, count: int) -> list[str]:
    """The first `count` documents of the validation shard (the last shard)."""
    from model.data import iter_documents, read_shard_paths

    _, val_path = read_shard_paths(data_dir)
    texts = []
    for doc in iter_documents([val_path]):
        if len(doc.split()) >= 60:
            texts.append(doc)
        if len(texts) == count:
            break
    return texts


# ------------------------------------------------------------------------------------------------ checks


def check_environment(args, device, sizes) -> dict:
    info = {"ok": True, "device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."), "cuda": torch.version.cuda}
    try:
        info["triton"] = importlib.import_module("triton").__version__
    except Exception as exc:  # noqa: BLE001 - report, do not fail: CPU wheels have no triton
        info["triton"] = f"unavailable ({type(exc).__name__})"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["gpu_count"] = torch.cuda.device_count()
        info["peak_bf16_flops"] = get_peak_flops(info["gpu"])
    info.update(attn.active().as_dict())  # what the model runs on here, and why not the better ones
    info["available_backends"] = available_backends(device)
    return info


def available_backends(device) -> list[str]:
    """Every attention backend that loads on this device (fa3/fa4 only where their kernels load)."""
    found = ["sdpa", "flex"]
    if device.type == "cuda":
        for name in ("fa3", "fa4"):
            try:
                attn.select(name, "cuda")
                found.append(name)
            except attn.AttentionUnavailable:
                pass
    return found


def check_gpt_vs_cpu(args, device, sizes, vocab_size: int) -> dict:
    """Forward + backward of the same small GPT on `device` and on CPU, in this process's COMPUTE_DTYPE."""
    fp32 = COMPUTE_DTYPE == torch.float32
    bounds = {"loss": 1e-4, "logits": 1e-4, "grads": 1e-3} if fp32 else {"loss": 2e-2, "logits": 3e-2, "grads": 1e-1}
    cpu_model = small_gpt(sizes, vocab_size, "cpu")
    dev_model = small_gpt(sizes, vocab_size, device)
    dev_model.load_state_dict(cpu_model.state_dict())
    g = torch.Generator().manual_seed(7)
    B, T = 2, sizes["small_seq"]
    x = torch.randint(0, vocab_size, (B, T), generator=g)
    y = torch.randint(0, vocab_size, (B, T), generator=g)
    out = {}
    for name, model, dev in (("cpu", cpu_model, torch.device("cpu")), ("device", dev_model, device)):
        logits = model(x.to(dev))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.to(dev).view(-1))
        loss.backward()
        out[name] = (loss.detach().cpu(), logits.detach().float().cpu(),
                     {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None})
    loss_err = abs(out["device"][0].item() - out["cpu"][0].item()) / abs(out["cpu"][0].item())
    logits_err = rel_err(out["device"][1], out["cpu"][1])
    names = sorted(out["cpu"][2])
    grads_err = rel_err(torch.cat([out["device"][2][n].flatten() for n in names]),
                        torch.cat([out["cpu"][2][n].flatten() for n in names]))
    worst = max(names, key=lambda n: rel_err(out["device"][2][n], out["cpu"][2][n]))
    return {"ok": loss_err < bounds["loss"] and logits_err < bounds["logits"] and grads_err < bounds["grads"],
            "dtype": str(COMPUTE_DTYPE).removeprefix("torch."), "loss_rel_err": loss_err,
            "logits_rel_err": logits_err, "grads_rel_err": grads_err, "worst_grad": worst,
            "worst_grad_rel_err": rel_err(out["device"][2][worst], out["cpu"][2][worst]), "bounds": bounds,
            "attention_backend": attn.dispatch(torch.zeros(1, device=device, dtype=COMPUTE_DTYPE))}


def check_gpt_fp32_in_child(args, device, sizes, vocab_size: int) -> dict:
    """check_gpt_vs_cpu in a child process with SPEEDRUN_DTYPE=float32 (the dtype is fixed at import)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--tokenizer-dir={args.tokenizer_dir}",
           f"--data-dir={args.data_dir}", "--only=gpt_in_this_dtype"] + (["--cpu"] if args.cpu else [])
    env = {**os.environ, "SPEEDRUN_DTYPE": "float32", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    try:
        result = json.loads(proc.stdout)["checks"]["gpt_in_this_dtype"]
    except (json.JSONDecodeError, KeyError):
        return {"ok": False, "error": f"child exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}
    return result


def check_attention(args, device, sizes) -> dict:
    """Each available backend against SDPA, forward and backward, windowed and full; timings at a d12 shape
    (FlexAttention compiled, as the model runs it)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = available_backends(device)
    B, T, H, D, W = sizes["attn_batch"], sizes["attn_seq"], sizes["attn_heads"], sizes["attn_dim"], sizes["attn_window"]
    g = torch.Generator().manual_seed(11)
    results, ok = {}, True
    for hkv in (H, max(1, H // 4)):  # plain and grouped-query attention
        q = (torch.randn(B, T, H, D, generator=g)).to(device, dtype)
        k = (torch.randn(B, T, hkv, D, generator=g)).to(device, dtype)
        v = (torch.randn(B, T, hkv, D, generator=g)).to(device, dtype)
        dy = (torch.randn(B, T, H, D, generator=g)).to(device, dtype)
        for window in ((-1, 0), (W, 0)):
            ref = run_attention("sdpa", q, k, v, dy, window)
            for backend in backends:
                got = run_attention(backend, q, k, v, dy, window)
                out_ok = torch.allclose(got[0].float(), ref[0].float(), atol=1e-2, rtol=1e-2)
                entry = {"out_max_abs_diff": (got[0].float() - ref[0].float()).abs().max().item()}
                if got[1] is None:
                    entry["backward"] = "not supported on this device (forward compared only)"
                    grads_ok = True
                else:
                    grad_errs = [(a.float() - b.float()).abs().max().item() for a, b in zip(got[1:], ref[1:])]
                    entry["grad_max_abs_diff"] = max(grad_errs)
                    grads_ok = all(e <= 5e-2 for e in grad_errs)
                results[f"{backend}_hkv{hkv}_window{window[0]}"] = {"ok": out_ok and grads_ok, **entry}
                ok &= out_ok and grads_ok
    timings = {}
    Bt, Tt, Ht = sizes["time_batch"], sizes["time_seq"], sizes["time_heads"]
    q = torch.randn(Bt, Tt, Ht, 128, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(Bt, Tt, Ht, 128, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(Bt, Tt, Ht, 128, device=device, dtype=dtype, requires_grad=True)
    for backend in backends:
        for window in ((-1, 0), (Tt // 4, 0)):
            def attend(q, k, v, window=window):
                return attn.flash_attn_func(q, k, v, causal=True, window_size=window)

            fn = torch.compile(attend) if backend == "flex" and device.type == "cuda" else attend
            try:
                with using_backend(backend):
                    ms = 1000 * timed(lambda: fn(q, k, v).float().sum().backward(), device, repeats=3, warmup=1)
            except NotImplementedError:  # no backward on this device
                ms = None
            timings[f"{backend}_window{window[0]}_ms"] = ms
    return {"ok": ok, "backends": backends, "model_backend": attn.active().backend, "comparisons": results,
            "timing_shape": [Bt, Tt, Ht, 128], "fwd_bwd": timings}


@contextlib.contextmanager
def using_backend(name: str):
    """Run attention on `name`: fused kernels by configuring them (then back to auto), flex and sdpa forced."""
    before = attn.active().requested
    if name in ("fa3", "fa4"):
        attn.configure(name, "cuda")
    else:
        attn.set_backend_override(name)
    try:
        yield
    finally:
        attn.set_backend_override(None)
        attn.configure(before)


def run_attention(backend, q, k, v, dy, window):
    """(output, dq, dk, dv) of flash_attn_func on `backend`; gradients None where it has no backward."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with using_backend(backend):
        try:
            y = attn.flash_attn_func(q, k, v, causal=True, window_size=window)
        except NotImplementedError:  # FlexAttention has no CPU backward (torch 2.13): forward compared only
            y = attn.flash_attn_func(q.detach(), k.detach(), v.detach(), causal=True, window_size=window)
            return y, None, None, None
        y.backward(dy)
    return y.detach(), q.grad, k.grad, v.grad


def check_fp8_linear(args, device, sizes) -> dict:
    from ops.fp8 import Float8Linear

    torch.manual_seed(3)
    base = torch.nn.Linear(sizes["fp8_in"], sizes["fp8_out"], bias=False).to(device)
    f8 = Float8Linear.from_linear(base)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(sizes["fp8_rows"], sizes["fp8_in"], device=device, dtype=dtype, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    wr = base.weight.detach().clone().requires_grad_()
    y = f8(x)
    y_ref = F.linear(xr.float(), wr)
    g = torch.randn_like(y_ref)
    y.float().backward(g)
    y_ref.backward(g)
    errs = {"forward": rel_err(y, y_ref), "grad_input": rel_err(x.grad, xr.grad),
            "grad_weight": rel_err(base.weight.grad, wr.grad)}
    result = {"ok": errs["forward"] < 0.08 and errs["grad_input"] < 0.12 and errs["grad_weight"] < 0.12,
              "rel_err": errs, "bounds": {"forward": 0.08, "gradients": 0.12}}
    if device.type == "cuda":
        a = torch.randn(sizes["fp8_rows"], sizes["fp8_in"], device=device, dtype=torch.bfloat16, requires_grad=True)
        w = base.weight.detach().to(torch.bfloat16).requires_grad_()
        bf16_s = timed(lambda: F.linear(a, w).float().square().mean().backward(), device)
        fp8_s = timed(lambda: f8(a).float().square().mean().backward(), device)
        result["fwd_bwd_ms"] = {"bf16": 1000 * bf16_s, "fp8": 1000 * fp8_s, "fp8_speedup": bf16_s / fp8_s}
    return result


def check_engine_greedy(args, device, sizes, tokenizer) -> dict:
    """Engine.generate_prompts (KV cache, ragged rows) against naive full-forward greedy decoding."""
    from model.engine import Engine

    model = small_gpt(sizes, tokenizer.get_vocab_size(), device, seed=5).eval()
    texts = [t[:200] for t in val_texts(args.data_dir, 4)]
    prompts = [tokenizer.encode(t, prepend=tokenizer.get_bos_token_id())[:sizes["small_seq"] // 2] for t in texts]
    n = sizes["engine_tokens"]
    with torch.inference_mode():
        engine_out = Engine(model, tokenizer).generate_prompts(prompts, max_tokens=n, temperature=0.0)
    engine = Engine(model, tokenizer)
    rows, ok = [], True
    for prompt, got in zip(prompts, engine_out):
        naive = []
        for token in model.generate(list(prompt), max_tokens=n, temperature=0.0):
            if token in engine.terminal:
                break
            naive.append(token)
        equal = got == naive[:len(got)] and len(got) == len(naive)
        row = {"tokens": len(got), "equal": equal}
        if not equal:  # allowed only at a near-tie of the full forward's top-2 logits (bf16 rounding)
            first = next((i for i, (a, b) in enumerate(zip(got, naive)) if a != b), min(len(got), len(naive)))
            with torch.inference_mode():
                logits = model(torch.tensor([prompt + naive[:first]], device=device))[0, -1].float()
            top2 = logits.topk(2).values
            row.update(first_divergence=first, top2_gap=(top2[0] - top2[1]).item())
            row["near_tie"] = row["top2_gap"] < (0.0 if COMPUTE_DTYPE == torch.float32 else 0.125)
            ok &= row["near_tie"]
        rows.append(row)
    return {"ok": ok, "prompts": rows}


def train_steps(args, device, sizes, tokenizer, fp8: bool) -> tuple[dict, object]:
    """d12 (CPU: d1) pretraining steps on the shards: compiled model and optimizer, like model.train."""
    from model.data import read_shard_paths
    from model.dataloader import BestFitLoader
    from bench.train_throughput import train_step
    from model.sizing import ModelShape

    depth, T, B = sizes["train_depth"], sizes["train_seq"], sizes["train_batch"]
    shape = ModelShape.from_depth(depth, aspect_ratio=64, head_dim=128 if device.type == "cuda" else 32,
                                  vocab_size=tokenizer.get_vocab_size(), seq_len=T, window_pattern="SSSL")
    config = GPTConfig(sequence_len=T, vocab_size=tokenizer.get_vocab_size(), n_layer=depth, n_head=shape.n_head,
                       n_kv_head=shape.n_head, n_embd=shape.model_dim, window_pattern="SSSL")
    torch.manual_seed(42)
    model = build_model(config, device)
    if fp8:
        from ops.fp8 import convert_to_float8_training

        convert_to_float8_training(model)
    optimizer = model.setup_optimizer(compile=sizes["compile"])
    compiled = torch.compile(model, dynamic=False) if sizes["compile"] else model
    train_paths, _ = read_shard_paths(args.data_dir)
    loader = BestFitLoader(tokenizer, train_paths, B, T, streams=[0], num_streams=1, device=device)
    times, losses = [], []
    for step in range(sizes["train_steps"]):
        x, y = next(loader)
        seconds, loss = train_step(compiled, model, optimizer, x, y, device)
        times.append(seconds)
        losses.append(loss.item())
    timed_steps = times[TIMED_FROM_STEP:] or times[1:] or times
    dt = statistics.median(timed_steps)
    flops_per_token = model.estimate_flops()
    result = {"depth": depth, "seq": T, "batch": B, "steps": len(times), "compiled": sizes["compile"], "fp8": fp8,
              "first_step_s": times[0], "ms_per_step": 1000 * dt, "tok_per_sec": B * T / dt,
              "losses": [round(v, 4) for v in losses], "finite": all(map(lambda v: v == v and abs(v) < 1e4, losses))}
    if device.type == "cuda":
        result["bf16_mfu"] = 100 * flops_per_token * result["tok_per_sec"] / get_peak_flops(torch.cuda.get_device_name(device))
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return result, model


def check_train_speed(args, device, sizes, tokenizer, keep: dict) -> dict:
    """bf16 on the selected attention backend, then FP8; on a fused backend also bf16 on FlexAttention, the
    speed a node without FA3/FA4 would get."""
    backend = attn.active().backend
    bf16, model = train_steps(args, device, sizes, tokenizer, fp8=False)
    keep["model"] = model  # the trained model feeds core_speed and engine_speed
    out = {"attention_backend": backend, "bf16": bf16, "ok": bf16["finite"]}
    if device.type == "cuda":
        fp8, _ = train_steps(args, device, sizes, tokenizer, fp8=True)
        out["fp8"] = fp8
        out["fp8_over_bf16_tok_per_sec"] = fp8["tok_per_sec"] / bf16["tok_per_sec"]
        out["ok"] = out["ok"] and fp8["finite"]
        if backend in ("fa3", "fa4"):
            with using_backend("flex"):
                flex, _ = train_steps(args, device, {**sizes, "train_steps": 20}, tokenizer, fp8=False)
            out["bf16_flex"] = flex
            out[f"{backend}_over_flex_tok_per_sec"] = bf16["tok_per_sec"] / flex["tok_per_sec"]
            out["ok"] = out["ok"] and flex["finite"]
    return out


def synthetic_core_tasks(data_dir: Path, items: int):
    """CORE-shaped tasks from shard text (no bundle needed): multiple choice (true continuation among 4),
    schema (which of 2 contexts the continuation follows) and language modeling (exact continuation)."""
    from model.eval_bundle import CoreTask

    docs = [d.split() for d in val_texts(data_dir, items + 4)]
    mc, schema, lm = [], [], []
    for i in range(items):
        words, others = docs[i], [docs[(i + j) % len(docs)] for j in (1, 2, 3)]
        gold = i % 4
        choices = [" ".join(o[30:38]) for o in others]
        choices.insert(gold, " ".join(words[30:38]))
        mc.append({"query": " ".join(words[:30]), "choices": choices, "gold": gold})
        schema.append({"context_options": [" ".join(words[:20]), " ".join(others[0][:20])][::1 - 2 * (i % 2)],
                       "continuation": " ".join(words[20:28]), "gold": i % 2})
        lm.append({"context": " ".join(words[:40]), "continuation": " ".join(words[40:42])})
    task = lambda label, kind, shots: CoreTask(label, kind, "", shots, " ", 0.0, Path("synthetic"))  # noqa: E731
    return [(task("synthetic_mc", "multiple_choice", 5), mc), (task("synthetic_schema", "schema", 3), schema),
            (task("synthetic_lm", "language_modeling", 5), lm)]


def check_core_speed(args, device, sizes, tokenizer, keep: dict) -> dict:
    from model.core_eval import evaluate_task
    from model.core_scoring import BatchedStats

    model = keep.get("model") or small_gpt(sizes, tokenizer.get_vocab_size(), device)
    seconds = {"prefix": 0.0, "batched": 0.0, "reference": 0.0}
    equal, examples, shared = True, 0, 0
    for task, data in synthetic_core_tasks(args.data_dir, sizes["core_items"]):
        decisions = {}
        for method in seconds:
            stats = BatchedStats()
            sync(device)
            t0 = time.perf_counter()
            decisions[method] = evaluate_task(model, tokenizer, task, data, device=device, method=method, stats=stats)
            sync(device)
            seconds[method] += time.perf_counter() - t0
            if method == "prefix":
                shared += stats.prefix_shared
        equal &= decisions["prefix"] == decisions["reference"] == decisions["batched"]
        examples += len(data)
    return {"ok": equal, "decisions_equal": equal, "examples": examples, "prefix_shared": shared,
            **{f"{m}_examples_per_s": examples / s for m, s in seconds.items()},
            "prefix_vs_batched": seconds["batched"] / seconds["prefix"],
            "prefix_vs_reference": seconds["reference"] / seconds["prefix"]}


def check_engine_speed(args, device, sizes, tokenizer, keep: dict) -> dict:
    from model.engine import Engine

    model = keep.get("model") or small_gpt(sizes, tokenizer.get_vocab_size(), device)
    model.eval()
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode(val_texts(args.data_dir, 1)[0][:400], prepend=tokenizer.get_bos_token_id())[:64]
    n = sizes["engine_tokens"]
    out = {"ok": True, "prompt_tokens": len(prompt), "new_tokens": n}
    for batch in (1, 8):
        engine.generate_prompts([prompt] * batch, max_tokens=4)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        generated = engine.generate_prompts([prompt] * batch, max_tokens=n)
        sync(device)
        out[f"batch{batch}_tok_per_sec"] = sum(map(len, generated)) / (time.perf_counter() - t0)
    model.train()
    return out


# --------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --cpu for the tiny CPU variant")
    device = torch.device("cpu" if args.cpu else "cuda")
    sizes = SIZES[device.type]
    if device.type == "cuda":
        torch.set_float32_matmul_precision("highest" if COMPUTE_DTYPE == torch.float32 else "high")
    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer_dir)
    vocab = tokenizer.get_vocab_size()
    keep: dict = {}
    checks = {
        "environment": lambda: check_environment(args, device, sizes),
        "gpt_fp32": lambda: check_gpt_fp32_in_child(args, device, sizes, vocab),
        "gpt_in_this_dtype": lambda: check_gpt_vs_cpu(args, device, sizes, vocab),
        "attention": lambda: check_attention(args, device, sizes),
        "fp8_linear": lambda: check_fp8_linear(args, device, sizes),
        "engine_greedy": lambda: check_engine_greedy(args, device, sizes, tokenizer),
        "train_speed": lambda: check_train_speed(args, device, sizes, tokenizer, keep),
        "core_speed": lambda: check_core_speed(args, device, sizes, tokenizer, keep),
        "engine_speed": lambda: check_engine_speed(args, device, sizes, tokenizer, keep),
    }
    wanted = [c for c in args.only.split(",") if c] or list(checks)
    unknown = sorted(set(wanted) - set(checks))
    if unknown:
        raise SystemExit(f"--only: unknown check(s) {unknown}; choose from {', '.join(checks)}")
    t_start = time.perf_counter()
    results = {}
    for name in wanted:
        t0 = time.perf_counter()
        try:
            results[name] = checks[name]()
        except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"gpu_check: {name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']}s)",
              file=sys.stderr, flush=True)
    if "gpt_in_this_dtype" in results and len(wanted) > 1:  # named by its dtype: gpt_bfloat16 on a GPU
        in_this_dtype = results.pop("gpt_in_this_dtype")
        results[f"gpt_{in_this_dtype.get('dtype', 'default_dtype')}"] = in_this_dtype
    failed = [name for name, r in results.items() if not r["ok"]]
    report = {"ok": not failed, "failed": failed, "mode": device.type, "checks": results,
              "seconds": round(time.perf_counter() - t_start, 1)}
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
