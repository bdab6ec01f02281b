"""The functional ops, one file per op family: ``lora_linear``, ``multi_lora``
(``multi_lora_linear``, ``packed_multi_lora_linear``), ``delta`` (``add_lora``), ``dora``,
``qlora``, ``embedding`` (``multi_lora_embedding``), each defined on the shared scaffold
(``_scaffold``). A docstring only: importing the package imports none of its modules.
"""
