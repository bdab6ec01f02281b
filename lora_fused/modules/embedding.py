"""LoRA on embeddings: ``LoRAEmbedding`` (PEFT's ``lora.Embedding``) and a multi-adapter
embedding for serving.

Math, for token ids ``idx`` (PEFT's names and shapes):

    y = E[idx] + s · A[:, idx]ᵀ Bᵀ       A = lora_embedding_A [r, num_embeddings]
                                         B = lora_embedding_B [embedding_dim, r]

The LoRA shrink of an embedding is a gather (A's columns at the ids: no matmul over the
vocabulary), then an [r] x [r, dim] expand per token. PEFT initialises A to zeros and B
from a normal distribution (the reverse of a linear layer), so a fresh adapter is a no-op;
so does :class:`LoRAEmbedding`. PEFT applies no dropout on embeddings; neither does this.

Serving (:class:`MultiLoRAEmbedding`, over the op :func:`lora_fused.ops.embedding.multi_lora_embedding`):
n adapter slots, each token its own slot (or -1); the A stack is kept as
[n, num_embeddings, r_max] (each token's rank row contiguous, as vLLM's ``lora_a_stacked``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dispatch.segments import SegmentPlan
from ..ops.embedding import multi_lora_embedding
from ..validation import check_finite_number, check_positive_int, check_rank
from .lora_linear import MergedFlagInStateDict, lora_scaling

__all__ = ["LoRAEmbedding", "MultiLoRAEmbedding"]


class LoRAEmbedding(MergedFlagInStateDict, nn.Embedding):
    """``y = E[idx] + scaling · A[:, idx]ᵀ Bᵀ`` with E frozen; a drop-in ``nn.Embedding``.

    State-dict keys are ``nn.Embedding``'s (``weight``) plus ``lora_embedding_A``
    [r, num_embeddings] and ``lora_embedding_B`` [embedding_dim, r] (PEFT's names), and
    ``_extra_state``: ``merged`` (see :class:`MergedFlagInStateDict`).
    ``merge()`` folds ``scaling · (B A)ᵀ`` into ``weight``; ``unmerge()`` takes it out.
    """

    LORA_FACTOR_NAMES = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, *, r: int = 8, lora_alpha: float = 8.0, use_rslora: bool = False,
                 device=None, dtype=None) -> None:
        check_positive_int(num_embeddings, "num_embeddings")
        check_positive_int(embedding_dim, "embedding_dim")
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, device=device, dtype=dtype)
        self.r = check_rank(r)
        self.lora_alpha = check_finite_number(lora_alpha, "lora_alpha")
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(self.r, self.lora_alpha, self.use_rslora)
        self.merged = False
        self.disabled = False
        self._attach_lora_parameters()

    def _attach_lora_parameters(self) -> None:
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_embedding_A = nn.Parameter(torch.empty(self.r, self.num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, self.r, **factory))
        self.weight.requires_grad_(False)
        if self.weight.device.type != "meta":
            self.reset_lora_parameters()

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, r: int = 8, lora_alpha: float = 8.0,
                       use_rslora: bool = False) -> "LoRAEmbedding":
        """Wrap an existing ``nn.Embedding``: its weight is reused (not copied) and frozen; its
        padding_idx / max_norm / norm_type / scale_grad_by_freq / sparse are kept."""
        if isinstance(embedding, LoRAEmbedding):
            raise TypeError(f"embedding is already a LoRAEmbedding (r={embedding.r}): use it as it is")
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, embedding.max_norm,
                    embedding.norm_type, embedding.scale_grad_by_freq, embedding.sparse, r=r,
                    lora_alpha=lora_alpha, use_rslora=use_rslora, device="meta", dtype=embedding.weight.dtype)
        layer.weight = embedding.weight
        layer._attach_lora_parameters()  # on the base's device (built on meta: no copy of E)
        layer.training = embedding.training
        return layer

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's init for embeddings: A = 0, B ~ N(0, 1): the adapter starts as a no-op."""
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def _embed(self, idx: Tensor, table: Tensor) -> Tensor:
        return F.embedding(idx, table, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def forward(self, idx: Tensor) -> Tensor:
        base = self._embed(idx, self.weight)
        if self.merged or self.disabled:
            return base
        after_a = self._embed(idx, self.lora_embedding_A.t())  # the gather-shrink: [..., r]
        return base + (after_a @ self.lora_embedding_B.t()) * self.scaling

    def delta_weight(self) -> Tensor:
        """``scaling · (B A)ᵀ`` [num_embeddings, embedding_dim] (what merge adds to weight)."""
        return (self.lora_embedding_A.t() @ self.lora_embedding_B.t()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError("LoRAEmbedding is already merged")
        self.weight += self.delta_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("LoRAEmbedding is not merged")
        self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


class MultiLoRAEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` with ``n_slots`` adapter slots for serving: each token its own.

    Buffers: ``lora_A`` [n_slots, V, r_max] (slot i holds PEFT's lora_embedding_Aᵀ, zero-padded
    past its rank), ``lora_B`` [n_slots, dim, r_max], ``scalings`` [n_slots], ``ranks`` [n_slots].
    ``forward(idx, adapter_ids_or_plan)``; a slot never set adds nothing (rank 0)."""

    def __init__(self, embedding: nn.Embedding, n_slots: int, r_max: int) -> None:
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        check_positive_int(n_slots, "n_slots")
        check_rank(r_max)
        self.embedding = embedding
        embedding.weight.requires_grad_(False)
        factory = {"device": embedding.weight.device, "dtype": embedding.weight.dtype}
        V, dim = embedding.weight.shape
        self.register_buffer("lora_A", torch.zeros(n_slots, V, r_max, **factory))
        self.register_buffer("lora_B", torch.zeros(n_slots, dim, r_max, **factory))
        self.register_buffer("scalings", torch.zeros(n_slots, dtype=torch.float32, device=factory["device"]))
        self.register_buffer("ranks", torch.zeros(n_slots, dtype=torch.int32, device=factory["device"]))

    @torch.no_grad()
    def set_adapter(self, slot: int, lora_embedding_A: Tensor, lora_embedding_B: Tensor, scaling: float) -> None:
        """Put PEFT's (lora_embedding_A [r, V], lora_embedding_B [dim, r], scaling) into ``slot``."""
        n, V, r_max = self.lora_A.shape
        if not 0 <= slot < n:
            raise ValueError(f"slot must lie in [0, {n}), got {slot}")
        r = lora_embedding_A.shape[0]
        if lora_embedding_A.shape != (r, V) or lora_embedding_B.shape != (self.lora_B.shape[1], r) or r > r_max:
            raise ValueError(f"lora_embedding_A must be [r <= {r_max}, {V}] and lora_embedding_B "
                             f"[{self.lora_B.shape[1]}, r], got {tuple(lora_embedding_A.shape)} and "
                             f"{tuple(lora_embedding_B.shape)}")
        check_finite_number(scaling, "scaling")
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :, :r] = lora_embedding_A.t()
        self.lora_B[slot, :, :r] = lora_embedding_B
        self.scalings[slot] = float(scaling)
        self.ranks[slot] = r

    def forward(self, idx: Tensor, adapter_ids_or_plan: Union[Tensor, SegmentPlan]) -> Tensor:
        return multi_lora_embedding(idx, self.embedding.weight, self.lora_A, self.lora_B, adapter_ids_or_plan,
                                    self.scalings, ranks=self.ranks, padding_idx=self.embedding.padding_idx,
                                    check_ranks=False)  # set_adapter keeps them in [0, r_max]
