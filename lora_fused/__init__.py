"""lora-fused: fast LoRA for PyTorch, with Triton kernels that never form B·A.

>>> import lora_fused as lf
>>> y = lf.lora_linear(x, weight, lora_A, lora_B, scaling, bias)
>>> layer = lf.LoRALinear.from_linear(linear, r=16, lora_alpha=32)
"""
from __future__ import annotations

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _map_source_kernels() -> None:
    """From a source checkout not installed with pip, load ``<root>/kernels`` as
    ``lora_fused.kernels`` (setup.py's package_dir does this for installs)."""
    name = __name__ + ".kernels"
    if name in _sys.modules or _importlib_util.find_spec(name) is not None:
        return
    init = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))),
                         "kernels", "__init__.py")
    if not _os.path.exists(init):
        return
    spec = _importlib_util.spec_from_file_location(name, init,
                                                   submodule_search_locations=[_os.path.dirname(init)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


_map_source_kernels()

from .backend import select_backend  # noqa: E402
from .injection import (inject_lora, lora_state_dict, mark_only_lora_as_trainable,  # noqa: E402
                        merge_lora, unmerge_lora)
from .layers import LoRALinear, lora_scaling  # noqa: E402
from .ops import lora_linear  # noqa: E402
from .multi_layers import (MultiLoRALinear, adapter_batch, add_adapter, inject_multi_lora,  # noqa: E402
                           load_peft_adapter_slot, multi_lora_layers, remove_adapter,
                           save_peft_adapter_slot)
from .multi_ops import multi_lora_linear  # noqa: E402
from .segments import SegmentPlan, plan_segments  # noqa: E402
from .peft_io import (from_peft_model, load_peft_adapter, read_peft_adapter,  # noqa: E402
                      save_peft_adapter)
from .reference import dropout_keep_mask, lora_linear_reference, multi_lora_linear_reference  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LoRALinear", "lora_linear", "inject_lora", "lora_state_dict",
           "mark_only_lora_as_trainable", "merge_lora", "unmerge_lora", "lora_scaling", "lora_linear_reference",
           "dropout_keep_mask", "select_backend", "load_peft_adapter", "save_peft_adapter",
           "from_peft_model", "read_peft_adapter", "multi_lora_linear", "plan_segments", "SegmentPlan",
           "multi_lora_linear_reference", "MultiLoRALinear", "adapter_batch", "add_adapter",
           "inject_multi_lora", "load_peft_adapter_slot", "multi_lora_layers", "remove_adapter", "save_peft_adapter_slot",
           "__version__"]
