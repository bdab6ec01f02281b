"""The layers: ``LoRALinear`` (``lora_linear``), ``DoRALinear``, ``LoRALinear4bit``
(``qlora``), ``LoRAEmbedding`` / ``MultiLoRAEmbedding`` (``embedding``), ``MultiLoRALinear``
(``multi_lora``). A docstring only: importing the package imports none of its modules.
"""
