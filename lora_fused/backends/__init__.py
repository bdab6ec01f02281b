"""Implementations of the ops in plain PyTorch (``torch_backend``), the CPU path and the
Triton launchers' twin. A docstring only: importing the package imports none of its modules.
"""
