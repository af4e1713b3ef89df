"""Attention backends for Quiet-STaR layouts, and the hook that plugs them into HF models.

A wrapped HF model runs with `config._attn_implementation = "qstar"`. Every attention layer then
calls `qstar_attention`, which:
  - with a `qstar_layout=` keyword (our passes): hands (q, k, v) to the backend named by the
    layout; the HF-side mask is a zero-size placeholder and is ignored;
  - without it (plain HF use: `model.base.generate`, user code): behaves exactly like HF's
    `sdpa` implementation, with HF's own causal/padding mask (the mask builder is HF's).

A backend is a callable `(query, key, value, layout, scaling) -> output` with
    query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) (RoPE applied, cache concatenated),
    output (B, Sq, Hq, D)   (HF's convention for attention functions).
Backends must agree with `DenseBackend` in values and gradients (tests check it); new ones
(split/element-wise, FlexAttention) register in `BACKENDS`.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .layout import Layout

ATTN_IMPLEMENTATION = "qstar"


class AttentionBackend(Protocol):
    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 layout: Layout, scaling: float) -> torch.Tensor: ...


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    layout: Layout, scaling: float) -> torch.Tensor:
    """Reference backend: the full (B, 1, Sq, Sk) additive mask from the layout tags, then SDPA.
    Memory O(Sq*Sk) for the mask; runs forward and backward on CPU and GPU, any float dtype."""
    mask = layout.additive_mask(query.dtype)                                   # (B, 1, Sq, Sk)
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv:  # grouped-query attention: each kv head serves hq // hkv query heads
        key = key.repeat_interleave(hq // hkv, dim=1)
        value = value.repeat_interleave(hq // hkv, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()                                    # (B, Sq, Hq, D)


BACKENDS: dict[str, AttentionBackend] = {"dense": dense_attention}


def qstar_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The function HF attention layers call (signature of HF's AttentionInterface)."""
    layout: Layout | None = kwargs.pop("qstar_layout", None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    if dropout and module.training:
        raise ValueError(f"attention dropout {dropout} is not supported by qstar attention backends")
    backend = BACKENDS.get(layout.backend)
    if backend is None:
        raise ValueError(f"unknown attention backend {layout.backend!r}; known: {sorted(BACKENDS)}")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return backend(query, key, value, layout, scaling), None


_registered = False


def register() -> str:
    """Register the "qstar" attention implementation with transformers (idempotent)."""
    global _registered
    if not _registered:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, qstar_attention)
        # Plain calls (no layout) get HF's own sdpa mask, so the model behaves like `sdpa`.
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _registered = True
    return ATTN_IMPLEMENTATION


def placeholder_mask(batch: int, device) -> torch.Tensor:
    """A zero-size 4-D tensor passed as HF's `attention_mask`: HF returns a 4-D mask unchanged,
    so no (Sq, Sk) mask is built on the HF side; the backend reads the layout instead."""
    return torch.zeros(batch, 1, 0, 0, device=device, dtype=torch.bool)


