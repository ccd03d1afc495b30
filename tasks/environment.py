"""The environment that changes the bits of what the model stages compute, as it goes into their keys.

Resolved on the node that runs the stage, before the stage's key is computed: the device type actually used
(an empty `runtime.device_type` autodetects, as model.common does), the compute dtype (SPEEDRUN_DTYPE /
NANOCHAT_DTYPE, else bf16 on CUDA SM80+, else fp32, as model.common.resolve_compute_dtype), the world size
(nnodes x nproc_per_node), the torch version and the attention backend (ops/attention.py). Changing any of
them re-executes exactly the stages whose results they change. A CPU run resolves without importing torch.
"""

from __future__ import annotations

import os
from importlib import metadata

DTYPE_ENV_VARS = ("SPEEDRUN_DTYPE", "NANOCHAT_DTYPE")  # as model.common.DTYPE_ENV_VARS (a test keeps them equal)


def resolved_device(device_type: str) -> str:
    if device_type:
        return device_type
    from model.common import autodetect_device_type

    return autodetect_device_type()


def compute_dtype(device: str) -> str:
    for var in DTYPE_ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0) else "float32"
    return "float32"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def numerics_environment(runtime, device_type: str = "") -> dict:
    """{device, dtype, world_size, torch, attention} for a model stage's key."""
    from tasks.launch import attention_backend

    device = resolved_device(device_type or runtime.device_type)
    return {"device": device, "dtype": compute_dtype(device), "world_size": runtime.world_size,
            "torch": package_version("torch"), "attention": attention_backend(runtime, device)}
