"""Process-wide compute settings shared by the model and the training scripts (docs/model.md#precision).

- COMPUTE_DTYPE: the activation dtype, decided once at import. The model never uses autocast: its
  Linear layers cast their fp32 master weights to this dtype and embeddings are stored in it.
- autodetect_device_type(): cuda, else mps, else cpu.
- get_peak_flops(device_name): peak dense BF16 FLOP/s of a GPU from its name, for MFU.
- print0(...): print on global rank 0 only.
- compute_init(device_type): seed, precision, the CPU allocator and (under torchrun) the process group;
  synchronize(device); dist_info(): (rank, world_size), (0, 1) outside a process group.
- retain_freed_cpu_memory(): keep freed heap blocks in the process (glibc), so CPU steps do not page-fault.
- decide_compile(mode, device_type, planned_steps): whether a training run compiles (--compile auto|on|off).
- setup_attention(requested, device_type): choose the attention backend (--attention), say which and why.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DTYPE_ENV_VARS = ("SPEEDRUN_DTYPE", "NANOCHAT_DTYPE")  # first one set (non-empty) wins
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_compute_dtype(env: Mapping[str, str] | None = None,
                          cuda_capability: tuple[int, int] | None = None) -> torch.dtype:
    """The dtype rule of docs/model.md#precision, as a pure function of the environment and the GPU.

    env defaults to os.environ; cuda_capability is (major, minor) of device 0, or None without CUDA
    (looked up when env gives no override and the argument is omitted).
    """
    env = os.environ if env is None else env
    for var in DTYPE_ENV_VARS:
        value = env.get(var, "")
        if value:
            if value not in DTYPE_NAMES:
                raise ValueError(f"{var}={value!r}: must be one of {', '.join(DTYPE_NAMES)}")
            return DTYPE_NAMES[value]
    if cuda_capability is None and torch.cuda.is_available():
        cuda_capability = torch.cuda.get_device_capability()
    if cuda_capability is not None and tuple(cuda_capability) >= (8, 0):
        return torch.bfloat16
    # Older CUDA (fp16 only by explicit opt-in, it needs a GradScaler), CPU and MPS: fp32.
    return torch.float32


COMPUTE_DTYPE: torch.dtype = resolve_compute_dtype()


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# Peak dense BF16 FLOP/s (docs/model.md#precision). A row matches when ALL its substrings occur in the lower-cased
# device name; the first matching row wins, so more specific rows come before the rows they contain
# (gb200 before b200, h100 nvl/pcie before h100, mi250x before mi250, l40s before l4, ...).
PEAK_FLOPS_TABLE: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gb200",), 2.5e15),
    (("grace blackwell",), 2.5e15),
    (("b200",), 2.25e15),
    (("b100",), 1.8e15),
    (("h200", "nvl"), 836e12),
    (("h200", "pcie"), 836e12),
    (("h200",), 989e12),
    (("h100", "nvl"), 835e12),
    (("h100", "pcie"), 756e12),
    (("h100",), 989e12),
    (("h800", "nvl"), 989e12),
    (("h800",), 756e12),
    (("a100",), 312e12),
    (("a800",), 312e12),
    (("a40",), 149.7e12),
    (("a30",), 165e12),
    (("l40s",), 362e12),
    (("l40-s",), 362e12),
    (("l40 s",), 362e12),
    (("l4",), 121e12),
    (("mi355",), 2.5e15),
    (("mi325",), 1.3074e15),
    (("mi300x",), 1.3074e15),
    (("mi300a",), 980.6e12),
    (("mi250x",), 383e12),
    (("mi250",), 362.1e12),
    (("5090",), 209.5e12),
    (("4090",), 165.2e12),
    (("3090",), 71e12),
)
INTEL_MAX_1550 = "data center gpu max 1550"  # 512 FLOP/clock per compute unit at 1300 MHz


def _intel_compute_units() -> int | None:
    xpu = getattr(torch, "xpu", None)
    try:
        if xpu is not None and xpu.is_available():
            return int(xpu.get_device_properties(0).max_compute_units)
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        pass
    return None


def get_peak_flops(device_name: str) -> float:
    """Peak BF16 dense FLOP/s for a device name (e.g. torch.cuda.get_device_name()); unknown -> inf."""
    name = device_name.lower()
    for patterns, flops in PEAK_FLOPS_TABLE:
        if all(p in name for p in patterns):
            return flops
    if INTEL_MAX_1550 in name:
        units = _intel_compute_units()
        if units is not None:
            return 512 * units * 1300e6
    log.warning("peak FLOP/s unknown for device %r; MFU will print as 0", device_name)
    return float("inf")


def print0(*args, **kwargs) -> None:
    """print() on global rank 0 only (RANK unset counts as rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


# glibc's allocator serves every block over 32 MiB with a fresh mmap and unmaps it on free, so on CPU each
# micro-step's B*T*vocab logits, their softcap and their gradient (268 MB each at T=256 x 8 x vocab 32768) are
# page-faulted and zeroed by the kernel again: 65k faults, ~65 ms for each such tensor on this 2-core VM.
# With mmap off and trimming only past 2 GiB free, freed blocks stay in the heap and the next step reuses them.
# Side by side at d4 / T=256 / batch 8x2 / vocab 32768 (runs with and without it alternating): eager 6.5 ->
# 3.1 s a step, compiled 3.2-3.4 -> 2.7-2.8 s, the same losses bit for bit. The cost: the process keeps its peak
# heap (eager at that size: ~5 GB resident instead of a ~2.4 GB peak), as a GPU caching allocator keeps its
# blocks. (docs/model.md#cpu-memory)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h> mallopt parameters
MALLOC_ENV_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def retain_freed_cpu_memory(environ: Mapping[str, str] | None = None) -> str:
    """Keep freed heap memory in this process (glibc mallopt: no mmap for large blocks, trim the heap only
    past 2 GiB free at its top), so a training step reuses the pages of the step before instead of faulting
    in fresh ones.
    Left as is where the C library is not glibc or the user has set glibc's malloc environment variables
    (MALLOC_MMAP_MAX_=65536 restores the default). Returns what it did, for the log."""
    environ = os.environ if environ is None else environ
    chosen = [var for var in MALLOC_ENV_VARS if var in environ]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return f"CPU allocator left as set by {', '.join(chosen)}"
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return "CPU allocator left as is (not glibc)"
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "CPU allocator left as is (mallopt refused)"
    return "CPU allocator: freed memory stays in the process for reuse (set MALLOC_MMAP_MAX_=65536 to release it)"


def compute_init(device_type: str) -> tuple[bool, int, int, int, torch.device]:
    """Seed, precision, the CPU allocator and (under torchrun) the process group: nccl on CUDA, gloo on CPU."""
    assert device_type in ("cuda", "cpu", "mps"), f"unknown device type {device_type!r}"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device-type=cuda but CUDA is not available")
    if device_type == "cpu":
        print0(retain_freed_cpu_memory())
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        torch.set_float32_matmul_precision("high")
    distributed = all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if not distributed:
        return False, 0, 0, 1, torch.device(device_type)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device(device_type)
        dist.init_process_group("gloo")
    dist.barrier()
    return True, rank, local_rank, world, device



# --compile auto on CPU: compiling the model and the optimizer's step functions costs a long first step
# (inductor builds C++ kernels) and then saves a fixed time per step; it pays only when the run is long
# enough. Break-even steps on a 2-core x86 VM (torch 2.13.0+cpu), d4, inductor's cache cold, measured with
# `python -m bench.train_throughput --compare-compile` at the cpu preset's size (T=256 / batch 16 / vocab 4096)
# and at T=256 / batch 8x2 / vocab 32768:
#   195 (1.23 -> 0.92 s a step, +59 s for the first) and 78 (3.02 -> 2.27 s, +58 s), with the one-pass
#   softcapped loss (model/softcap.py) and the blocks' GEMMs through oneDNN (ops/cpu_matmul.py);
#   before them 366-614 and 156-280 on different days (the day-to-day spread is ~15%).
# 250 compiles the cpu preset's pretraining (600 steps), not its SFT (200) nor the smoke (20). On CUDA
# compiling always pays.
CPU_COMPILE_MIN_STEPS = 250
CPU_COMPILE_NOTE = "compiling on 2 CPU cores pays after ~200 steps at the cpu preset's size"


def decide_compile(mode: str, device_type: str, planned_steps: int) -> tuple[bool, str]:
    """(compile?, why) for --compile `mode` on `device_type` with `planned_steps` optimizer steps.

    Decided from the plan, never from the steps left after a resume: a resumed run must run the same code
    as the run it continues. auto: always on CUDA; on CPU from CPU_COMPILE_MIN_STEPS planned steps.
    """
    if mode == "on":
        return True, "--compile=on"
    if mode == "off":
        return False, "--compile=off"
    if mode != "auto":
        raise ValueError(f"--compile must be auto, on or off, got {mode!r}")
    if device_type == "cuda":
        return True, "--compile=auto on CUDA"
    if device_type == "cpu" and planned_steps >= CPU_COMPILE_MIN_STEPS:
        return True, f"--compile=auto: {planned_steps} planned steps >= {CPU_COMPILE_MIN_STEPS} ({CPU_COMPILE_NOTE})"
    if device_type == "cpu":
        return False, f"--compile=auto: {planned_steps} planned steps < {CPU_COMPILE_MIN_STEPS} ({CPU_COMPILE_NOTE})"
    return False, f"--compile=auto: not compiled on {device_type}"


ATTENTION_CHOICES = ("auto", "fused", "fa3", "fa4", "flex", "sdpa")  # ops.attention.REQUESTS


def setup_attention(requested: str, device_type: str, say=print) -> dict:
    """Configure ops.attention for this process (`--attention`), print the backend and why, and return what
    a summary.json records: attention_backend, attention_requested, attention_reason. A request that cannot
    be met (e.g. fused on a node without FlashAttention) exits naming the option and the install command."""
    from ops import attention

    try:
        selection = attention.configure(requested, device_type)
    except attention.AttentionUnavailable as exc:
        raise SystemExit(f"--attention {requested}: {exc}") from None
    say(f"attention: {selection.backend} ({selection.reason})")
    return selection.as_dict()


def dist_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def compute_cleanup() -> None:
    """End of a torchrun entry point: wait for every rank (rank 0 may still be writing), then leave the group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
