"""Adapters on whole models: injection of LoRA layers (``injection``); PEFT's adapter format
(``peft_config``), its reading and loading (``peft_read``), writing (``peft_write``) and live
PEFT models (``peft_live``); many adapters on one model (``multi_lora``: inject_multi_lora,
add_adapter, adapter_batch) and PEFT adapters in and out of its slots (``peft_slots``).
A docstring only: importing the package imports none of its modules.
"""
