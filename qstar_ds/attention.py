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




def split_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    layout: Layout, scaling: float) -> torch.Tensor:
    """The paper appendix's faster scheme, without any (Sq, Sk) tensor.

    Base queries: causal attention over the base keys (an (n, n) mask). Stream queries, grouped
    as (M streams, Lq tokens): one masked product against the n base keys (each stream sees the
    base up to its anchor) and a per-stream block product against the stream's own keys (at most
    t + K + 1 of them), merged in one softmax over [base | own] logits (the log-sum-exp merge).
    Memory O(M * Lq * (n + Lk)) per head instead of O((n + M L)^2). Exact (same math as dense).
    """
    structure = layout.structure()
    B, H, Sq, D = query.shape
    hkv = key.shape[1]
    g = H // hkv
    n = structure.n
    out = query.new_empty(B, Sq, H, D)
    if structure.n_base_queries:
        qb = query[:, :, :structure.n_base_queries]
        kb, vb = key[:, :, :n], value[:, :, :n]
        if g > 1:
            kb, vb = kb.repeat_interleave(g, dim=1), vb.repeat_interleave(g, dim=1)
        mask = layout.base_additive_mask(query.dtype)                          # (B, 1, nq, n)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scaling)
        out[:, :structure.n_base_queries] = ob.transpose(1, 2)
    if structure.n_streams:
        M, Lq = structure.n_streams, structure.queries_per_stream
        qs = query[:, :, structure.n_base_queries:].reshape(B, hkv, g, M, Lq, D)
        kb, vb = key[:, :, :n], value[:, :, :n]                                # (B, hkv, n, D)
        ko, vo = key[:, :, structure.own_keys], value[:, :, structure.own_keys]              # (B, hkv, M, Lk, D)
        s_base = torch.einsum("bhgmqd,bhkd->bhgmqk", qs, kb) * scaling        # (B, hkv, g, M, Lq, n)
        s_own = torch.einsum("bhgmqd,bhmkd->bhgmqk", qs, ko) * scaling        # (B, hkv, g, M, Lq, Lk)
        neg = torch.finfo(s_base.dtype).min
        s_base = s_base.masked_fill(~structure.base_visible[:, None, None, :, None, :], neg)   # (B,1,1,M,1,n)
        s_own = s_own.masked_fill(~structure.own_visible, neg)                                 # (Lq, Lk)
        p = torch.softmax(torch.cat([s_base, s_own], dim=-1), dim=-1)
        o = torch.einsum("bhgmqk,bhkd->bhgmqd", p[..., :n], vb) \
            + torch.einsum("bhgmqk,bhmkd->bhgmqd", p[..., n:], vo)            # (B, hkv, g, M, Lq, D)
        out[:, structure.n_base_queries:] = o.reshape(B, H, M * Lq, D).transpose(1, 2)
    return out


BACKENDS["split"] = split_attention


# ---- FlexAttention (block-sparse; GPUs) ----------------------------------------------------
_compiled_flex = None
FLEX_MIN_HEAD_DIM = 16      # FlexAttention's Triton templates: "NYI: embedding dimension ... at least 16"


def _flex_fn(device: torch.device):
    """flex_attention, compiled on CUDA (uncompiled it runs a dense math fallback); eager on CPU,
    where torch 2.13 has a FlexAttention forward but no backward."""
    global _compiled_flex
    import warnings

    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cpu" and device.type != "cuda":
        return flex_attention
    if device.type == "cpu":       # the unfused path is the point here (tests, no backward anyway)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def flex_attention_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           layout: Layout, scaling: float) -> torch.Tensor:
    """FlexAttention with a block mask built from the layout's visibility rule (layout.block_mask):
    blocks of 128 x 128 that nothing in them may see are skipped, so a packed pass costs about
    (base blocks + each stream block's own diagonal) instead of S^2. GQA natively. Forward and
    backward on CUDA; on CPU forward only (refused when a gradient is needed: use `split`)."""
    if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
        raise RuntimeError("attention_backend=flex: torch has no FlexAttention backward on CPU; "
                           "use attention_backend=split (or auto) on CPU")
    if query.device.type == "cuda" and query.shape[-1] < FLEX_MIN_HEAD_DIM:
        raise RuntimeError(f"attention_backend=flex: head_dim {query.shape[-1]} < {FLEX_MIN_HEAD_DIM}, which "
                           "FlexAttention's CUDA kernels do not support; use attention_backend=split")
    if query.device.type == "cuda" and query.dtype == torch.float64:
        raise RuntimeError("attention_backend=flex: FlexAttention's CUDA kernels have no float64 "
                           "(Triton fails to compile them); use attention_backend=split or dense")
    bm = layout.block_mask(query.shape[2], key.shape[2], query.device)
    out = _flex_fn(query.device)(query, key, value, block_mask=bm, scale=scaling,
                                 enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()                                    # (B, Sq, Hq, D)


BACKENDS["flex"] = flex_attention_backend


AUTO_NOTE = {
    "cpu": "split: torch has no FlexAttention backward on CPU",
    "cuda": "split: measured faster than flex on GPU; flex recompiles for every rollout step's key length "
            "(docs/PERFORMANCE.md)",
}


def resolve_backend(name: str) -> str:
    """"auto" -> split on every device, for the reasons in AUTO_NOTE (flex stays an explicit choice:
    equal to dense in values and gradients on CUDA, float32/bfloat16, head_dim >= 16)."""
    return "split" if name == "auto" else name


def auto_note(device_type: str) -> str:
    """Why `auto` chose what it chose on this device (for the logs)."""
    return AUTO_NOTE.get(device_type, "split: the backend that runs forward and backward everywhere")
