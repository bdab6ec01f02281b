"""Adapters on whole models: injection of LoRA layers (``injection``) and PEFT files and
models (``peft_io``). A docstring only: importing the package imports none of its modules.
"""
