"""Serving many adapters from one model, below the layers: ``routing`` (which slot each row of
a ``MultiLoRALinear`` forward reads, per caller: ``AdapterRouting`` and the ContextVar behind
``adapter_batch``) and ``slots`` (slot lifetime: install, hot swap, pinning, the wait for a
slot). The model-level API over them is ``lora_fused.adapters.multi_lora``; the contract they
keep is docs/serving.md. A docstring only: importing the package imports none of its modules.
"""
