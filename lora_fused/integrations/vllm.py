"""vLLM's LoRA interface (its punica wrapper) on lora-fused's delta kernels.

Layouts and meaning follow vLLM's ``vllm/lora/punica_wrapper/punica_base.py`` and
``punica_gpu.py`` (tests/integrations/test_engine_wrappers.py cites the commits read), with layer layouts
from ``vllm/lora/layers/``:

- ``lora_a_stacked``: a tuple, one per output slice, of [max_loras, 1, max_rank, in];
- ``lora_b_stacked``: a tuple of [max_loras, 1, out_j, max_rank];
- each token's adapter slot (the wrapper's ``token_lora_indices``), -1 = no LoRA; the
  logits use the per-sample mapping (``sampler_indices``) instead;
- ``scale`` multiplies the delta (vLLM passes 1.0: PEFT's scaling is folded into B when an
  adapter is loaded); every adapter uses all max_rank rows (zero-padded).

Two ways in:

- :class:`LoRAFusedPunicaWrapper`, the object vLLM's layers call (``add_lora_linear``,
  ``add_shrink``, ...) after its model runner gave the batch to ``update_metadata``;
  :func:`register` makes vLLM construct it instead of its own (opt-in: see there).
- The free functions :func:`add_lora_linear`, :func:`add_lora_embedding`,
  :func:`add_lora_logits`, which take the mapping tensor as an argument.

y is updated in place (and returned, for platforms that cannot update in place); x and y may
carry leading dimensions (viewed as 2-D, as vLLM does). The slices stay vLLM's own tensors:
the Triton kernels read each slice from its base address (an int64 table per layer, made once:
addresses do not change when ``set_lora`` writes in place), so nothing is copied; the torch
backend (CPU) stacks them per call.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..dispatch.backend import on_tensor_device
from ..dispatch.segments import SegmentPlan
from ..ops.delta import (PackedA, add_lora, add_lora_slices, apply_expand, apply_shrink, check_writable_output,
                         resolve_plan)
from . import RowPlans, cached_plan, constant_vector, copy_from_host, opt_in_entry_point, refuse_unknown

__all__ = ["LoRAFusedPunicaWrapper", "add_lora_linear", "add_lora_embedding", "add_lora_logits", "register",
           "load_plugin", "OPT_IN_VARIABLE"]

#: The environment variable that lets the ``vllm.general_plugins`` entry point act (see :func:`load_plugin`).
OPT_IN_VARIABLE = "LORA_FUSED_VLLM"


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------

def _check_stacks(lora_a_stacked, lora_b_stacked, output_slices) -> tuple[int, ...]:
    if not isinstance(lora_a_stacked, (tuple, list)) or not isinstance(lora_b_stacked, (tuple, list)):
        raise TypeError("lora_a_stacked and lora_b_stacked must be tuples of tensors, one per output slice "
                        f"(vLLM's layout), got {type(lora_a_stacked).__name__} and {type(lora_b_stacked).__name__}")
    widths = tuple(int(w) for w in output_slices)
    if not (len(lora_a_stacked) == len(lora_b_stacked) == len(widths) >= 1):
        raise ValueError(f"lora_a_stacked ({len(lora_a_stacked)}), lora_b_stacked ({len(lora_b_stacked)}) and "
                         f"output_slices {widths} must have one entry per slice")
    a0 = lora_a_stacked[0]
    for j, (a, b) in enumerate(zip(lora_a_stacked, lora_b_stacked)):
        if a.dim() != 4 or a.shape[1] != 1 or a.shape != a0.shape:
            raise ValueError(f"lora_a_stacked[{j}] must be [max_loras, 1, max_rank, in] like slice 0 "
                             f"{tuple(a0.shape)}, got {tuple(a.shape)}")
        if tuple(b.shape) != (a0.shape[0], 1, widths[j], a0.shape[2]):
            raise ValueError(f"lora_b_stacked[{j}] must be [max_loras={a0.shape[0]}, 1, out_j={widths[j]}, "
                             f"max_rank={a0.shape[2]}] (output_slices {widths}), got {tuple(b.shape)}")
    return widths


def _check_4d(name: str, t) -> None:
    if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[1] != 1:
        raise ValueError(f"{name} must be a tensor [max_loras, 1, rows, cols], got "
                         f"{getattr(t, 'shape', type(t).__name__)}")


def _plan(mapping: Tensor, n: int, T: int, device, name: str) -> SegmentPlan:
    """The plan of the first T entries of an engine's (possibly longer, preallocated) mapping."""
    if not isinstance(mapping, Tensor):
        raise TypeError(f"{name} must be an int tensor [T], got {type(mapping).__name__}")
    if mapping.dim() != 1 or mapping.shape[0] < T:
        raise ValueError(f"{name} must be 1-D with at least T={T} entries (one per token), got shape "
                         f"{tuple(mapping.shape)}")
    ids = mapping[:T]
    return cached_plan(("vllm", name, n, T), (ids,), ids, lambda: resolve_plan(ids, n, T, device, name))


def _scale_vector(scale, n: int, device) -> Tensor:
    """fp32 [n]: a Python number for every slot, or a tensor of 1 or n values (moved to ``device``,
    never read on the host)."""
    if isinstance(scale, Tensor):
        if scale.numel() == 1:
            return scale.reshape(1).to(device=device, dtype=torch.float32).expand(n)
        if tuple(scale.shape) == (n,):
            return scale.to(device=device, dtype=torch.float32)
        raise ValueError(f"scale must be a number, a one-element tensor or a tensor [max_loras={n}], got a "
                         f"tensor of shape {tuple(scale.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or a tensor, got {type(scale).__name__}")
    return constant_vector(float(scale), n, torch.float32, device)


def _cast(tensors: Sequence[Tensor], dtype: torch.dtype) -> tuple:
    """The tensors in ``dtype`` (vLLM keeps LoRA weights in ``lora_dtype``, which may differ from
    the activations': a copy per call then, as vLLM's torch ops make)."""
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def _into(y2d: Tensor, dtype: torch.dtype, add) -> None:
    """``add(out)`` adds a delta computed in ``dtype`` into ``out``: y itself when it has that
    dtype, else a zero buffer added to y after (fp32 logits over bf16 activations)."""
    if y2d.dtype == dtype:
        add(y2d)
        return
    delta = torch.zeros(y2d.shape, dtype=dtype, device=y2d.device)
    add(delta)
    y2d.add_(delta)


# --------------------------------------------------------------------------
# The computations, given a plan (shared by the free functions and the wrapper)
# --------------------------------------------------------------------------

def _linear_delta(y2d: Tensor, x2d: Tensor, lora_a_stacked, lora_b_stacked, scalings: Tensor,
                  widths: tuple[int, ...], plan: SegmentPlan) -> None:
    """y[t, o_j:o_j+w_j] += s_i (x[t] A_j[i,0]ᵀ) B_j[i,0]ᵀ: one shrink for all slices, one expand."""
    if len(widths) == 1:  # views: nothing copied
        add_lora(y2d, x2d, lora_a_stacked[0], lora_b_stacked[0][:, 0], plan, scalings, slices=widths)
    else:
        add_lora_slices(y2d, x2d, [a[:, 0] for a in lora_a_stacked], [b[:, 0] for b in lora_b_stacked], plan,
                        scalings)


def _embedding_delta(y2d: Tensor, x2d: Tensor, lora_b_stacked: Tensor, plan: SegmentPlan, add_inputs: bool) -> None:
    """y[t] += x[t] B[i, 0]ᵀ (no scale); ``add_inputs=False``: rows with a LoRA hold the delta alone."""
    n, _, dim, r_max = lora_b_stacked.shape
    with torch.no_grad():
        if not add_inputs:
            y2d.masked_fill_((plan.adapter_ids >= 0)[:, None], 0)
        apply_expand(y2d, x2d, lora_b_stacked[:, 0], plan, constant_vector(1.0, n, torch.float32, y2d.device),
                     constant_vector(r_max, n, torch.int32, y2d.device), (dim,), compact=False)


def _logits_delta(y2d: Tensor, x2d: Tensor, lora_a_stacked: Tensor, lora_b_stacked: Tensor, scalings: Tensor,
                  plan: SegmentPlan) -> None:
    """y[s, :V] += s_i (x[s] A[i,0]ᵀ) B[i,0,:V]ᵀ, V = min(y's width, the LoRA vocabulary)."""
    common = min(y2d.shape[1], lora_b_stacked.shape[2])
    add_lora(y2d[:, :common], x2d, lora_a_stacked, lora_b_stacked[:, 0, :common], plan, scalings)


# --------------------------------------------------------------------------
# Free functions: the mapping as an argument
# --------------------------------------------------------------------------

def add_lora_linear(y: Tensor, x: Tensor, lora_a_stacked: Sequence[Tensor], lora_b_stacked: Sequence[Tensor],
                    scale, output_slices: Sequence[int], token_lora_mapping: Tensor) -> Tensor:
    """``y[t, o_j:o_j+w_j] += scale · (x[t] A_j[i,0]ᵀ) B_j[i,0]ᵀ`` for ``i = token_lora_mapping[t] >= 0``.

    vLLM's ``add_lora_linear`` semantics (one shrink for all slices, one expand); y [T, sum(out_j)]
    in place (returned); ``scale`` a number or a tensor of 1 or max_loras values."""
    widths = _check_stacks(lora_a_stacked, lora_b_stacked, output_slices)
    y2d, x2d = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    n = lora_a_stacked[0].shape[0]
    plan = _plan(token_lora_mapping, n, x2d.shape[0], x.device, "token_lora_mapping")
    _linear_delta(y2d, x2d, lora_a_stacked, lora_b_stacked, _scale_vector(scale, n, x.device), widths, plan)
    return y


def _check_embedding(y: Tensor, x: Tensor, lora_b_stacked) -> None:
    _check_4d("lora_b_stacked", lora_b_stacked)
    _, _, dim, r_max = lora_b_stacked.shape
    if y.shape[-1] != dim or x.shape[-1] != r_max or x.numel() // r_max != y.numel() // dim:
        raise ValueError(f"y must be [T, dim={dim}] and x [T, max_rank={r_max}] (lora_b_stacked "
                         f"{tuple(lora_b_stacked.shape)}), got y {tuple(y.shape)}, x {tuple(x.shape)}")
    check_writable_output(y)


def add_lora_embedding(y: Tensor, x: Tensor, lora_b_stacked: Tensor, token_lora_mapping: Tensor,
                       add_inputs: bool = True) -> Tensor:
    """``y[t] += x[t] B[i, 0]ᵀ`` for ``i = token_lora_mapping[t] >= 0`` (no scale), vLLM's embedding expand.

    x [T, max_rank] holds each token's LoRA-A embedding row (vLLM gathers it from
    ``lora_a_stacked_2d`` with the token ids offset by adapter); lora_b_stacked
    [max_loras, 1, dim, max_rank]; y [T, dim]. ``add_inputs=False``: rows with a LoRA are
    overwritten by their delta, as vLLM's expand does; rows with -1 are left alone."""
    _check_embedding(y, x, lora_b_stacked)
    for name, t in (("x", x), ("lora_b_stacked", lora_b_stacked)):
        if t.dtype != y.dtype or t.device != y.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device} but y is {y.dtype} on {y.device}")
    y2d, x2d = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    plan = _plan(token_lora_mapping, lora_b_stacked.shape[0], y2d.shape[0], y.device, "token_lora_mapping")
    _embedding_delta(y2d, x2d, lora_b_stacked, plan, add_inputs)
    return y


def add_lora_logits(y: Tensor, x: Tensor, lora_a_stacked: Tensor, lora_b_stacked: Tensor, scale,
                    sampler_lora_mapping: Tensor) -> Tensor:
    """``y[s, :V] += scale · (x[s] A[i, 0]ᵀ) B[i, 0, :V]ᵀ`` for ``i = sampler_lora_mapping[s] >= 0``,
    V = min(y's width, the LoRA vocabulary).

    vLLM's ``add_lora_logits`` (the LM head's LoRA over the sampled rows): x [S, hidden],
    lora_a_stacked [max_loras, 1, max_rank, hidden], lora_b_stacked [max_loras, 1, vocab, max_rank],
    y [S, width] in place. The logits may be wider than the LoRA vocabulary (vLLM pads them for
    the lm head and cuts the padding off afterwards): the delta goes into the leading columns,
    as vLLM's ``bgmv_expand`` (``vllm/lora/ops/torch_ops/lora_ops.py``) adds into
    ``min(outputs.shape[1], output_tensor.shape[1])`` columns; the rest of y is left as it is."""
    _check_4d("lora_a_stacked", lora_a_stacked)
    _check_4d("lora_b_stacked", lora_b_stacked)
    n = lora_a_stacked.shape[0]
    y2d, x2d = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    plan = _plan(sampler_lora_mapping, n, x2d.shape[0], x.device, "sampler_lora_mapping")
    _logits_delta(y2d, x2d, lora_a_stacked, lora_b_stacked, _scale_vector(scale, n, x.device), plan)
    return y


# --------------------------------------------------------------------------
# The punica wrapper
# --------------------------------------------------------------------------

def _slot_table(lora_ids: np.ndarray, lora_index_to_id, name: str) -> np.ndarray:
    """Each LoRA id's slot in ``lora_index_to_id`` (its first, as ``list.index``), -1 for ids <= 0
    (no LoRA), as vLLM's ``convert_mapping``; ValueError for an id in no slot."""
    slot_of: dict = {}
    for slot, lora_id in enumerate(lora_index_to_id):
        if lora_id is not None:
            slot_of.setdefault(lora_id, slot)
    unique, inverse = np.unique(lora_ids, return_inverse=True)
    slots = np.empty(unique.shape[0], dtype=np.int64)
    for k, lora_id in enumerate(unique.tolist()):
        if lora_id <= 0:
            slots[k] = -1
        elif lora_id in slot_of:
            slots[k] = slot_of[lora_id]
        else:
            raise ValueError(f"mapping.{name} holds LoRA id {lora_id}, which is in no slot of lora_index_to_id "
                             f"{list(lora_index_to_id)}: activate the adapter before its batch")
    return slots[inverse.reshape(-1)]


def _to_device(buffer: Tensor, values: np.ndarray) -> None:
    """``buffer[..., :len]`` = values (host), without waiting for the device."""
    copy_from_host(buffer[..., :values.shape[-1]], torch.from_numpy(values))


def _is_bias(value) -> bool:
    """Whether a positional argument is vLLM's ``lora_bias_stacked`` (None, or a tuple of
    tensors and Nones) rather than ``output_slices`` (ints)."""
    return value is None or (isinstance(value, (tuple, list))
                             and all(v is None or isinstance(v, Tensor) for v in value))


def _add_lora_bias(y2d: Tensor, lora_bias_stacked, widths: tuple[int, ...], ids: Tensor) -> None:
    """vLLM's ``_apply_bias``: y[t, o_j:o_j+w_j] += bias_j[i, 0] for i = ids[t] >= 0, unscaled, the
    slices from column 0 (vLLM ignores ``offset_start`` there too). bias_j [max_loras, 1, w_j] or None."""
    if len(lora_bias_stacked) != len(widths):
        raise ValueError(f"lora_bias_stacked has {len(lora_bias_stacked)} entries for {len(widths)} output slices")
    live = (ids >= 0)[:, None]
    start = 0
    for j, (bias, width) in enumerate(zip(lora_bias_stacked, widths)):
        if bias is not None:
            if bias.shape[-1] != width:
                raise ValueError(f"lora_bias_stacked[{j}] must be [max_loras, 1, {width}], got {tuple(bias.shape)}")
            rows = bias.reshape(-1, width).index_select(0, ids.clamp(min=0))
            y2d[:, start:start + width] += torch.where(live, rows, 0).to(y2d.dtype)
        start += width


def _slice_list(t, count: int, name: str) -> list:
    """vLLM's per-slice buffers: a tensor [S, T, r] or a tuple of S tensors [T, r], as a list of [T, r]."""
    parts = list(t) if isinstance(t, (tuple, list)) else (list(t.unbind(0)) if isinstance(t, Tensor) and t.dim() == 3
                                                          else None)
    if parts is None or len(parts) != count or any(p.dim() != 2 for p in parts):
        raise ValueError(f"{name} must be a tensor [{count}, T, rank] or a tuple of {count} tensors [T, rank] "
                         f"(one per slice), got {getattr(t, 'shape', type(t).__name__)}")
    return parts


@on_tensor_device
def _shrink_slices(x2d: Tensor, outs: list, lora_a_stacked, scale, plan: SegmentPlan) -> None:
    """outs[j][t] = scale · x[t] A_j[i, 0]ᵀ for rows with an adapter, 0 for the others (vLLM's
    shrink zeroes its buffer first)."""
    n, _, r_max, _ = lora_a_stacked[0].shape
    ranks = constant_vector(r_max, n, torch.int32, x2d.device)
    if isinstance(scale, Tensor):  # per row: the slot's scale (base rows are 0 whatever it is)
        scale = _scale_vector(scale, n, x2d.device).index_select(0, plan.row_weights)[:, None]
    with torch.no_grad():
        for out, a in zip(outs, lora_a_stacked):
            torch.mul(apply_shrink(x2d, PackedA(a, compact=False), plan, ranks), scale, out=out)


@on_tensor_device
def _expand_slices(y2d: Tensor, parts: list, lora_b_stacked, widths, offset: int, plan: SegmentPlan,
                   add_inputs: bool) -> None:
    """y[t, offset + o_j : ... + w_j] (+)= parts[j][t] B_j[i, 0]ᵀ for rows with an adapter."""
    n, _, _, r_max = lora_b_stacked[0].shape
    ones = constant_vector(1.0, n, torch.float32, y2d.device)
    ranks = constant_vector(r_max, n, torch.int32, y2d.device)
    live = (plan.adapter_ids >= 0)[:, None]
    with torch.no_grad():
        for part, b, width in zip(parts, lora_b_stacked, widths):
            cols = y2d[:, offset:offset + width]
            if not add_inputs:
                cols.masked_fill_(live, 0)
            apply_expand(cols, part, b[:, 0], plan, ones, ranks, (width,), compact=False)
            offset += width


class LoRAFusedPunicaWrapper:
    """vLLM's punica wrapper (``PunicaWrapperBase``'s interface) on lora-fused's delta kernels.

    vLLM's model runner gives each batch to :meth:`update_metadata` (its ``LoRAMapping``: LoRA
    ids per token and per sample, ``is_prefill``); every LoRA layer then calls ``add_lora_linear``
    (or ``add_shrink`` / ``add_expand`` with a collective between, ``add_lora_embedding``,
    ``add_lora_logits``) with its own stacks and no mapping. The slots go into fixed device
    buffers (``_token_lora_indices``, ``_sampler_indices``, ... as vLLM's base class keeps them:
    its embedding layer reads ``_embeddings_indices``); the plan is built on the device at the
    first layer call of the batch and shared by every other one (:class:`~lora_fused.integrations.RowPlans`:
    no host sync, CUDA-graph safe, rows past the mapping get no LoRA).

    Signatures are vLLM's current ones; the older forms with ``lora_bias_stacked`` (positional,
    before ``scale`` in ``add_lora_linear`` and before ``output_slices`` in ``add_expand``)
    are recognised and the bias added as vLLM's ``_apply_bias`` did. ``scale`` may be a number
    or a tensor; LoRA weights in another dtype than the activations are cast per call. vLLM's
    layers pass ``add_input=`` (sic) to ``add_expand`` / ``add_lora_embedding``: taken as
    ``add_inputs``. Any other unknown argument raises TypeError. The fused-MoE methods are not
    provided (NotImplementedError): serve MoE LoRA with vLLM's own wrapper."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, *, max_loras: int | None = None,
                 lora_config=None, **kwargs):
        refuse_unknown(kwargs, "LoRAFusedPunicaWrapper")
        self.device = torch.device(device)
        self.max_batches = max_batches
        self.max_loras = max_loras if max_loras is not None else getattr(lora_config, "max_loras", None)
        self._tokens = RowPlans(max_num_batched_tokens, self.device)
        self._samples = RowPlans(max_num_batched_tokens, self.device)
        # vLLM's names for the same buffers (its layers and tools read them)
        self._token_lora_indices = self._tokens.ids
        self._sampler_indices = self._samples.ids
        self._sampler_indices_padded = torch.zeros(max_num_batched_tokens, dtype=torch.long, device=self.device)
        self._embeddings_indices = torch.zeros(2, max_num_batched_tokens, dtype=torch.long, device=self.device)
        self.indices_len: list = [None] * 4
        self.is_prefill = False
        self.no_lora = True

    # ---- the batch --------------------------------------------------------

    def update_metadata(self, mapping, lora_index_to_id: list, max_loras: int, vocab_size: int,
                        extra_vocab_size: int = 0, **kwargs) -> None:
        """The batch's mapping (``index_mapping``: a LoRA id per token, 0 = none; ``prompt_mapping``:
        per sample; ``is_prefill``) as slots in the wrapper's buffers, the values of vLLM's
        ``convert_mapping``. Host work on the mapping's lists and asynchronous copies: no host sync."""
        refuse_unknown(kwargs, "update_metadata")
        tokens = np.fromiter(mapping.index_mapping, dtype=np.int64)
        samples = np.fromiter(mapping.prompt_mapping, dtype=np.int64)
        token_slots = _slot_table(tokens, lora_index_to_id, "index_mapping")
        sample_slots = _slot_table(samples, lora_index_to_id, "prompt_mapping")
        self._tokens.set_rows(torch.from_numpy(token_slots))
        self._samples.set_rows(torch.from_numpy(sample_slots))
        embedding_slots = np.where(tokens > 0, token_slots, 0)
        embeddings = np.stack([embedding_slots * extra_vocab_size, embedding_slots * (vocab_size + extra_vocab_size)])
        _to_device(self._embeddings_indices, np.where(embeddings == -1, max_loras - 1, embeddings))
        padded = np.where(sample_slots == -1, max_loras - 1, sample_slots)
        _to_device(self._sampler_indices_padded, np.arange(padded.shape[0]) + padded * padded.shape[0])
        self.indices_len[:] = [tokens.shape[0], samples.shape[0], samples.shape[0], tokens.shape[0]]
        self.is_prefill = bool(mapping.is_prefill)
        self.no_lora = not bool((tokens > 0).any())

    @property
    def token_lora_indices(self) -> Tensor:
        return self._token_lora_indices[:self.indices_len[0]]

    @property
    def sampler_indices(self) -> Tensor:
        return self._sampler_indices[:self.indices_len[1]]

    @property
    def sampler_indices_padded(self) -> Tensor:
        return self._sampler_indices_padded[:self.indices_len[2]]

    @property
    def embeddings_indices(self) -> Tensor:
        return self._embeddings_indices[:, :self.indices_len[3]]

    # ---- the layer calls --------------------------------------------------

    def add_shrink(self, y, x: Tensor, lora_a_stacked, scale, **kwargs):
        """``y[j][t] = scale · x[t] A_j[i, 0]ᵀ`` for every slice j (0 on rows without LoRA, as vLLM's
        shrink, which zeroes its buffer); y a tensor [S, T, rank] (fp32) or a tuple of [T, rank]."""
        refuse_unknown(kwargs, "add_shrink")
        x2d = x.reshape(-1, x.shape[-1])
        outs = _slice_list(y, len(lora_a_stacked), "y")
        plan = self._tokens.plan(x2d.shape[0], lora_a_stacked[0].shape[0])
        _shrink_slices(x2d, outs, _cast(lora_a_stacked, x.dtype), scale, plan)
        return y

    def add_expand(self, y: Tensor, x, lora_b_stacked, output_slices, *positional, offset_start: int = 0,
                   add_inputs: bool = True, **kwargs):
        """``y[:, offset_start + o_j : ... + w_j] += x[j] B_j[i, 0]ᵀ`` for rows with a LoRA (no scale);
        x a tensor [S, T, rank] or a tuple of [T, rank]. vLLM's GPU wrapper always adds;
        ``add_inputs=False`` overwrites those rows' slice columns (its CPU wrapper's meaning)."""
        bias = kwargs.pop("lora_bias_stacked", None)
        if _is_bias(output_slices) and positional:  # the form with lora_bias_stacked
            bias, output_slices, positional = output_slices, positional[0], positional[1:]
        if len(positional) > 2:
            raise TypeError(f"add_expand() takes at most offset_start and add_inputs after output_slices, got "
                            f"{len(positional)} more positional arguments")
        if positional:  # the base class's positional order: offset_start, add_inputs
            offset_start = positional[0]
            add_inputs = positional[1] if len(positional) > 1 else add_inputs
        add_inputs = kwargs.pop("add_input", add_inputs)  # vLLM's layers spell it so
        refuse_unknown(kwargs, "add_expand")
        widths = tuple(int(w) for w in output_slices)
        parts = _slice_list(x, len(widths), "x")
        y2d = y.view(-1, y.shape[-1])
        if len(lora_b_stacked) != len(widths) or offset_start + sum(widths) > y2d.shape[1]:
            raise ValueError(f"lora_b_stacked has {len(lora_b_stacked)} slices and output_slices {widths} from "
                             f"offset_start={offset_start} must fit y's {y2d.shape[1]} columns")
        check_writable_output(y)
        plan = self._tokens.plan(parts[0].shape[0], lora_b_stacked[0].shape[0])
        if bias is not None:
            _add_lora_bias(y2d, bias, widths, self._tokens.ids[:y2d.shape[0]])
        _expand_slices(y2d, parts, _cast(lora_b_stacked, y.dtype), widths, offset_start, plan, add_inputs)
        return y

    def add_lora_embedding(self, y: Tensor, x: Tensor, lora_b_stacked: Tensor, add_inputs: bool = True, **kwargs):
        """``y[t] += x[t] B[i, 0]ᵀ`` (no scale) for each token's slot i >= 0 (see :func:`add_lora_embedding`)."""
        add_inputs = kwargs.pop("add_input", add_inputs)
        refuse_unknown(kwargs, "add_lora_embedding")
        _check_embedding(y, x, lora_b_stacked)
        y2d = y.view(-1, y.shape[-1])
        x2d, b = _cast((x.reshape(-1, x.shape[-1]), lora_b_stacked), y.dtype)
        _embedding_delta(y2d, x2d, b, self._tokens.plan(y2d.shape[0], b.shape[0]), add_inputs)
        return y

    def add_lora_linear(self, y: Tensor, x: Tensor, lora_a_stacked, lora_b_stacked, scale, output_slices,
                        *bias_form, buffer=None, **kwargs):
        """``y[t, o_j:o_j+w_j] += scale · (x[t] A_j[i,0]ᵀ) B_j[i,0]ᵀ`` for each token's slot i >= 0 (see
        :func:`add_lora_linear`). With ``buffer`` (vLLM's CPU form: the shrink's output, [S, T, rank]
        or a tuple) the shrink is written there, then expanded from it."""
        bias = kwargs.pop("lora_bias_stacked", None)
        if bias_form:  # (..., lora_b_stacked, lora_bias_stacked, scale, output_slices)
            if len(bias_form) > 1:
                raise TypeError(f"add_lora_linear() takes 7 positional arguments at most, got {6 + len(bias_form)}")
            bias, scale, output_slices = scale, output_slices, bias_form[0]
        refuse_unknown(kwargs, "add_lora_linear")
        widths = _check_stacks(lora_a_stacked, lora_b_stacked, output_slices)
        y2d, x2d = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
        n = lora_a_stacked[0].shape[0]
        plan = self._tokens.plan(x2d.shape[0], n)
        if bias is not None:
            _add_lora_bias(y2d, bias, widths, self._tokens.ids[:x2d.shape[0]])
        if buffer is not None:
            self.add_shrink(buffer, x2d, lora_a_stacked, scale)
            return self.add_expand(y, buffer, lora_b_stacked, widths)
        a, b = _cast(lora_a_stacked, x.dtype), _cast(lora_b_stacked, x.dtype)
        scalings = _scale_vector(scale, n, x.device)
        _into(y2d, x.dtype, lambda out: _linear_delta(out, x2d, a, b, scalings, widths, plan))
        return y

    def add_lora_logits(self, y: Tensor, x: Tensor, lora_a_stacked: Tensor, lora_b_stacked: Tensor, scale, *,
                        buffer=None, **kwargs):
        """``y[s, :V] += scale · (x[s] A[i,0]ᵀ) B[i,0,:V]ᵀ`` for each sample's slot i >= 0 (see
        :func:`add_lora_logits`); logits in another dtype than x (vLLM's fp32 lm head) are fine.
        With ``buffer`` [S, rank] the shrink is written there first."""
        refuse_unknown(kwargs, "add_lora_logits")
        _check_4d("lora_a_stacked", lora_a_stacked)
        _check_4d("lora_b_stacked", lora_b_stacked)
        y2d, x2d = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
        n = lora_a_stacked.shape[0]
        plan = self._samples.plan(x2d.shape[0], n)
        if buffer is not None:
            common = min(y2d.shape[1], lora_b_stacked.shape[2])
            _shrink_slices(x2d, [buffer.view(-1, buffer.shape[-1])], _cast((lora_a_stacked,), x.dtype), scale, plan)
            _expand_slices(y2d, [buffer.view(-1, buffer.shape[-1])], _cast((lora_b_stacked[:, :, :common],), y.dtype),
                           (common,), 0, plan, True)
            return y
        a, b = _cast((lora_a_stacked, lora_b_stacked), x.dtype)
        scalings = _scale_vector(scale, n, x.device)
        _into(y2d, x.dtype, lambda out: _logits_delta(out, x2d, a, b, scalings, plan))
        return y

    def moe_lora_align_block_size(self, *args, **kwargs):
        raise NotImplementedError(NO_MOE)

    def add_lora_fused_moe(self, *args, **kwargs):
        raise NotImplementedError(NO_MOE)


NO_MOE = ("LoRAFusedPunicaWrapper has no fused-MoE LoRA: serve MoE models' LoRA with vLLM's own punica wrapper "
          f"(unset {OPT_IN_VARIABLE})")


# --------------------------------------------------------------------------
# Selection by vLLM
# --------------------------------------------------------------------------

#: The class vLLM resolves by name (``vllm.utils.import_utils.resolve_obj_by_qualname``).
WRAPPER_QUALNAME = f"{LoRAFusedPunicaWrapper.__module__}.{LoRAFusedPunicaWrapper.__qualname__}"


def register() -> str:
    """Make vLLM use :class:`LoRAFusedPunicaWrapper` in this process, and return its qualified name.

    vLLM builds its wrapper from ``current_platform.get_punica_wrapper()``, a qualified class
    name (``vllm/lora/punica_wrapper/punica_selector.py``): this replaces that method on the
    current platform's class. vLLM runs its model in worker processes, which call their
    ``vllm.general_plugins`` entry points but not this: set ``LORA_FUSED_VLLM=1`` for every
    vLLM process instead (lora-fused's entry point, :func:`load_plugin`, then calls this).
    ImportError when vLLM is not installed."""
    try:
        from vllm.platforms import current_platform
    except ImportError as error:
        raise ImportError("lora_fused.integrations.vllm.register() needs vLLM (`from vllm.platforms import "
                          f"current_platform` failed: {error}); install vllm, or call the free functions "
                          "add_lora_linear / add_lora_embedding / add_lora_logits yourself") from error
    type(current_platform).get_punica_wrapper = classmethod(lambda cls: WRAPPER_QUALNAME)
    return WRAPPER_QUALNAME


#: The plugin entry point (setup.py), run by vLLM in each of its processes: registers the wrapper only
#: when ``LORA_FUSED_VLLM=1``.
load_plugin = opt_in_entry_point(OPT_IN_VARIABLE, register, "vLLM")
