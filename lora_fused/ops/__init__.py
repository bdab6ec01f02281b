"""The functional ops: ``lora_linear``, ``multi_lora``, ``delta`` (``add_lora``), on the
shared custom-op scaffold (``_scaffold``). A docstring only: importing the package imports
none of its modules.
"""
