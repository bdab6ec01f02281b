"""Triton kernels of lora-fused, installed as ``lora_fused.kernels``.

One file per kernel family; each holds the ``@triton.jit`` kernels, their
block-config table and thin launchers. Nothing here imports ``lora_fused``.
"""
