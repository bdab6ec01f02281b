"""Adapters on whole models: injection of LoRA layers (``injection``); PEFT's adapter format
(``peft_config``), its reading and loading (``peft_read``), writing (``peft_write``) and live
PEFT models (``peft_live``). A docstring only: importing the package imports none of its modules.
"""
