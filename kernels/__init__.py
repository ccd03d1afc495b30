"""Low-level compute kernels for the speedrun model: ``attention`` picks the fastest available
attention implementation (FlashAttention-3 on Hopper, FlexAttention with sliding-window block
masks on other CUDA devices, PyTorch SDPA with explicit masks on CPU/MPS) behind one FA3-style
API, and ``fp8`` implements tensorwise-scaled FP8 linear layers on top of ``torch._scaled_mm``.
This package depends on torch only and never imports ``model/`` or anything above it.
"""
