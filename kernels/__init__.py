"""Triton kernels of lora-fused, installed as ``lora_fused.kernels``.

One file per kernel family; each holds the ``@triton.jit`` kernels, their
block-config table and thin launchers. Nothing here imports ``lora_fused``.
"""
if __name__ == "kernels":
    # Imported as a top-level ``kernels``: a process started in a checkout's root (``python -m
    # pytest``, ``python -m lora_fused.demo``) has the root on sys.path, and this folder shadows
    # PyPI's ``kernels`` (Hugging Face's, which transformers >= 5.25 requires and imports).
    # Load the installed package in our place, as if this folder were not on the path.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (the checkout's kernels/ folder is lora_fused.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
