"""lora-fused: fast LoRA for PyTorch, with Triton kernels that never form B·A.

>>> import lora_fused as lf
>>> y = lf.lora_linear(x, weight, lora_A, lora_B, scaling, bias)
>>> layer = lf.LoRALinear.from_linear(linear, r=16, lora_alpha=32)
"""
from __future__ import annotations

# kernels/ (top level in the repository) is installed as lora_fused.kernels by setup.py's
# package_dir, for editable installs too; a checkout used without `pip install -e .` lacks it.
from .dispatch.backend import select_backend
from .adapters.injection import (inject_lora, lora_state_dict, mark_only_lora_as_trainable,
                                 merge_lora, unmerge_lora)
from .modules.lora_linear import LoRALinear, lora_scaling
from .ops.lora_linear import lora_linear
from .modules.qlora import LoRALinear4bit
from .ops.qlora import qlora_linear
from .modules.dora import DoRALinear
from .ops.dora import dora_linear
from .ops.grouped import grouped_lora_linear, plan_experts
from .modules.experts import LoRAExperts
from .modules.multi_lora import MultiLoRALinear
from .adapters.multi_lora import (adapter_batch, add_adapter, inject_multi_lora, multi_lora_layers,
                                  remove_adapter)
from .adapters.peft_slots import load_peft_adapter_slot, save_peft_adapter_slot
from .ops.multi_lora import multi_lora_linear, packed_multi_lora_linear
from .dispatch.segments import SegmentPlan, plan_segments
from .ops.delta import add_lora
from .modules.embedding import LoRAEmbedding, MultiLoRAEmbedding
from .ops.embedding import multi_lora_embedding
from . import integrations
from .dispatch.strategies import available_strategies, current_strategy, use_strategy
from .adapters.peft_live import from_peft_model
from .adapters.peft_read import load_peft_adapter, read_peft_adapter
from .adapters.peft_write import save_peft_adapter
from .reference import (dropout_keep_mask, grouped_lora_linear_reference, lora_linear_reference,
                        multi_lora_linear_reference)

__version__ = "0.1.0"
__all__ = ["LoRALinear", "lora_linear", "inject_lora", "lora_state_dict",
           "mark_only_lora_as_trainable", "merge_lora", "unmerge_lora", "lora_scaling", "lora_linear_reference",
           "dropout_keep_mask", "select_backend", "load_peft_adapter", "save_peft_adapter",
           "from_peft_model", "read_peft_adapter", "multi_lora_linear", "plan_segments", "SegmentPlan",
           "multi_lora_linear_reference", "MultiLoRALinear", "adapter_batch", "add_adapter",
           "inject_multi_lora", "load_peft_adapter_slot", "multi_lora_layers", "remove_adapter", "save_peft_adapter_slot",
           "LoRALinear4bit", "qlora_linear", "__version__"]
__all__ += ["available_strategies", "current_strategy", "use_strategy"]
__all__ += ["add_lora", "packed_multi_lora_linear", "LoRAEmbedding", "MultiLoRAEmbedding", "multi_lora_embedding", "integrations"]
__all__ += ["DoRALinear", "dora_linear"]
__all__ += ["grouped_lora_linear", "plan_experts", "grouped_lora_linear_reference", "LoRAExperts"]
