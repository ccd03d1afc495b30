"""Low-level operations of the speedrun model: ``attention`` runs attention on the fastest backend the machine
has (FlashAttention-3 or -4 on Hopper/Blackwell, FlexAttention compiled into the model, SDPA) behind one
FlashAttention-style API and says which and why; ``fp8`` implements tensorwise-scaled FP8 linear layers on top
of ``torch._scaled_mm``. This package depends on torch only and never imports ``model/`` or anything above it.
It is named ``ops``, not ``kernels``, so that Hugging Face's ``kernels`` package, which serves FA3 builds,
imports beside it.
"""
