"""Writing PEFT LoRA adapter directories (the format: ``peft_config``): ``save_peft_adapter(model,
directory)`` writes one that ``peft.PeftModel.from_pretrained(base_model, directory)`` loads;
``write_peft_adapter`` is the writer behind it and the multi-adapter ``save_peft_adapter_slot``.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from typing import Any, Mapping, Optional

from torch import Tensor, nn

from .injection import lora_experts_layers, lora_layers, matches_target
from .peft_experts import ExpertEntry, expert_entries
from .peft_config import CONFIG_NAME, KEY_PREFIX, PICKLE_NAME, SAFETENSORS_NAME, directory_argument, lora_key
from ..modules.dora import DoRALinear
from ..modules.embedding import LoRAEmbedding


def target_modules_for(model: nn.Module, injected: list[str]) -> list[str]:
    """Module-name suffixes (or full names) that select exactly ``injected`` under PEFT's list rule."""
    names = [n for n, _ in model.named_modules() if n]
    injected_set = set(injected)

    def selected(keys) -> set[str]:
        return {n for n in names if matches_target(n, keys)}

    keys = set()
    for name in injected:
        leaf = name.rsplit(".", 1)[-1]
        keys.add(leaf if selected([leaf]) <= injected_set else name)
    if selected(keys) != injected_set:
        raise ValueError("cannot write target_modules that select exactly the LoRA modules of this "
                         f"model (the names {sorted(selected(keys) - injected_set)[:4]} would be "
                         "selected too)")
    return sorted(keys)


def _json_number(value: float):
    return int(value) if float(value).is_integer() else float(value)


def save_peft_adapter(model: nn.Module, directory) -> None:
    """Write ``model``'s LoRA layers as a PEFT LoRA adapter directory.

    ``adapter_config.json`` gets ``r`` / ``lora_alpha`` as the most common values, with
    ``rank_pattern`` / ``alpha_pattern`` (keys ``^<escaped full name>``) for the modules that
    differ, and ``target_modules`` as suffixes (or full names) selecting exactly the adapted
    modules. ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight`` /
    ``.lora_B.weight`` in the layers' dtype. ``peft.PeftModel.from_pretrained(base, directory)``
    loads it. Merged layers are refused (``unmerge_lora(model)`` first).
    """
    layers = lora_layers(model)
    embeddings = {n: m for n, m in model.named_modules() if isinstance(m, LoRAEmbedding)}
    experts = expert_entries(model)  # LoRAExperts: target_parameters
    if not layers and not embeddings and not experts:
        raise ValueError(f"{type(model).__name__} has no LoRALinear (or LoRAEmbedding, LoRAExperts) layers to save")
    merged_embeddings = [n for n, m in embeddings.items() if m.merged]
    if merged_embeddings:
        raise ValueError(f"LoRA embeddings {merged_embeddings[:4]} are merged; unmerge() them before "
                         "save_peft_adapter (a merged adapter would be applied twice on load)")
    if "" in layers:
        raise ValueError("the model itself is a LoRALinear; PEFT names adapted modules inside a "
                         "model, so wrap it in a module (e.g. nn.Sequential(layer)) to save it")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"LoRA layers {merged[:4]} are merged into their base weights; call "
                         "lf.unmerge_lora(model) before save_peft_adapter (a merged adapter would "
                         "be applied twice on load)")
    expert_layers = list(lora_experts_layers(model).values())
    for field in ("use_rslora", "lora_dropout"):
        values = {getattr(layer, field) for layer in [*layers.values(), *expert_layers]}
        if len(values) > 1:
            raise ValueError(f"PEFT's adapter_config.json has one {field} for all modules, but this "
                             f"model's LoRA layers use {sorted(values)}")
    dora = {isinstance(layer, DoRALinear) for layer in layers.values()}
    if len(dora) > 1:
        raise ValueError("PEFT's adapter_config.json has one use_dora for all modules, but this model mixes "
                         "DoRALinear and LoRALinear layers")
    rslora = {layer.use_rslora for layer in [*layers.values(), *embeddings.values(), *expert_layers]}
    if len(rslora) > 1:
        raise ValueError("PEFT's adapter_config.json has one use_rslora for all modules, but this model's "
                         f"LoRA layers and embeddings use {sorted(rslora)}")
    first = next(iter([*layers.values(), *expert_layers, *embeddings.values()]))
    entries = {name: (layer.lora_A, layer.lora_B, layer.lora_alpha) for name, layer in layers.items()}
    entries.update({name: (layer.lora_embedding_A, layer.lora_embedding_B, layer.lora_alpha)
                    for name, layer in embeddings.items()})
    magnitudes = ({name: layer.lora_magnitude_vector for name, layer in layers.items()}
                  if dora == {True} else None)
    write_peft_adapter(model, directory, entries, use_rslora=first.use_rslora,
                       lora_dropout=first.lora_dropout if layers or expert_layers else 0.0, magnitudes=magnitudes,
                       embedding_modules=set(embeddings), experts=experts)


def write_peft_adapter(model: nn.Module, directory, entries: Mapping[str, tuple[Tensor, Tensor, float]], *,
                       use_rslora: bool, lora_dropout: float,
                       magnitudes: Optional[Mapping[str, Tensor]] = None, embedding_modules=(),
                       target_modules: Optional[list[str]] = None,
                       experts: Optional[Mapping[str, ExpertEntry]] = None) -> None:
    """Write ``{module name: (lora_A [r, in], lora_B [out, r], lora_alpha)}`` of ``model`` as a PEFT
    LoRA adapter directory (the writer behind ``save_peft_adapter`` and the multi-adapter
    ``save_peft_adapter_slot``): ``r`` / ``lora_alpha`` the most common values, ``rank_pattern`` /
    ``alpha_pattern`` (keys ``^<escaped full name>``) for the modules that differ. ``magnitudes``
    ``{module name: [out]}``: a DoRA adapter (``use_dora``, keys ``<m>.lora_magnitude_vector`` as PEFT).
    ``target_modules``: written as given (entries that are not modules of ``model``: packed slices).
    ``experts`` ``{<module>.<parameter>: ExpertEntry}``: expert factors in PEFT's ParamWrapper layout,
    written under ``target_parameters`` (full parameter names; see ``peft_experts``)."""
    experts = experts or {}
    ranks = {name: A.shape[0] for name, (A, _, _) in entries.items()}
    alphas = {name: alpha for name, (_, _, alpha) in entries.items()}
    ranks.update({name: entry.r for name, entry in experts.items()})
    alphas.update({name: entry.lora_alpha for name, entry in experts.items()})
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    rank_pattern = {"^" + re.escape(n): v for n, v in ranks.items() if v != r}
    alpha_pattern = {"^" + re.escape(n): _json_number(v) for n, v in alphas.items() if v != alpha}
    model_config = getattr(model, "config", None)
    name_or_path = (getattr(model_config, "_name_or_path", None) or getattr(model_config, "name_or_path", None)
                    or getattr(model, "name_or_path", None) or None)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name_or_path if isinstance(name_or_path, str) else None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _json_number(alpha),
        "lora_dropout": lora_dropout,
        "use_rslora": use_rslora,
        "target_modules": target_modules_for(model, list(entries)) if target_modules is None else target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": magnitudes is not None,
    }
    if experts:
        config["target_parameters"] = sorted(experts)
    from safetensors.torch import save_file
    tensors = {}
    for name, (A, B, _) in entries.items():
        for ab, t in (("A", A), ("B", B)):
            key = f"{KEY_PREFIX}{name}.lora_embedding_{ab}" if name in embedding_modules else lora_key(name, ab)
            tensors[key] = t.detach().to("cpu").contiguous().clone()
    for entry in experts.values():
        tensors[lora_key(entry.path, "A")] = entry.lora_A.to("cpu").contiguous().clone()
        tensors[lora_key(entry.path, "B")] = entry.lora_B.to("cpu").contiguous().clone()
    for name, magnitude in (magnitudes or {}).items():
        tensors[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = magnitude.detach().to("cpu").contiguous().clone()
    def write_config(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    directory = directory_argument(directory)
    _replace_files(directory, {
        SAFETENSORS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
        CONFIG_NAME: write_config,
    })
    stale = os.path.join(directory, PICKLE_NAME)
    if os.path.isfile(stale):
        # It held an older adapter: next to the new files it would be a second, different
        # adapter (tools that read .bin first, or by glob, would load it).
        os.remove(stale)
        warnings.warn(f"save_peft_adapter: removed the stale {stale} (an older adapter) beside "
                      f"the new {SAFETENSORS_NAME}", stacklevel=3)


def _replace_files(directory: str, writers: Mapping[str, Any]) -> None:
    """Write each ``{name: write(path)}`` of ``directory`` all-or-nothing.

    Every file is first written under a temporary name beside its final one; only when all
    writes succeeded are they renamed into place (``os.replace``: atomic per file on POSIX
    and Windows). A failure while writing leaves the directory as it was (temporary files
    removed; a directory this call created is removed again). Between the renames a crash
    could still mix files, a window of microseconds rather than the length of a write.
    """
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    temporary = {name: os.path.join(directory, f".{name}.{os.getpid()}.tmp") for name in writers}
    try:
        for name, write in writers.items():
            write(temporary[name])
    except BaseException:
        for path in temporary.values():
            if os.path.exists(path):
                os.remove(path)
        if created and not os.listdir(directory):
            os.rmdir(directory)
        raise
    for name, path in temporary.items():
        os.replace(path, os.path.join(directory, name))
