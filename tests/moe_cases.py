"""Tiny mixture-of-experts models of several transformers families, built from config (random
weights, fp32), for the expert-LoRA tests: ``tiny_moe(family)`` and ``experts_modules(model)``."""
from __future__ import annotations

import torch
from torch import nn

#: family -> (config class name, model class name, config overrides beyond the common small sizes)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1,
                       mlp_only_layers=[], head_dim=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=6,
                       num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=6, num_experts_per_tok=2, head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=6, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                         first_k_dense_replace=0, n_shared_experts=1, kv_lora_rank=8, q_lora_rank=16,
                         qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                      first_k_dense_replace=0, n_shared_experts=1, head_dim=8)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=6, num_experts_per_tok=2, head_dim=8, layer_types=None)),
}
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def tiny_moe(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A 2-layer model of ``family`` with every layer's MLP an MoE block, fp32, eval mode."""
    import transformers
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # transformers' init leaves some expert stacks at zero (empty): random values
        for module in experts_modules(model).values():
            for param in module.parameters():
                param.normal_(0, 0.2)
    return model


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The experts modules (transformers' ``@use_experts_implementation`` classes) of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")}
