"""Where every token of a Quiet-STaR forward pass sits, and which keys it may see.

Pure tensor code (no deepspeed, no transformers). A `Layout` describes one forward pass over
B rows. Each query and each key carries a *tag*:

    stream == -1 : a base token; idx = its index i in x_0 .. x_{n-1}
    stream == m  : token idx (0-based) of thought stream m; stream m hangs after base index
                   anchor[b, m] of row b

and the visibility rule is the one of the paper's "diagonal" mask:

    base query i        sees base keys j <= i              (and not padding)
    stream query (m, s) sees base keys j <= anchor[b, m]   (and not padding)
                        and keys (m, s') of its own stream with s' <= s

Tags are shared by all rows (the token *order* is the same in every row); rows differ only in
padding (`base_valid`) and anchors. The order of keys is free: the packed learn pass puts the base
first and then each stream contiguously (stream-major); the KV-cached rollout appends one block
per decoding step (step-major). Attention backends (`attention.py`) read the tags and never
depend on the order.

Position ids (RoPE): base token i sits at p(i) = (#valid tokens before i); stream token s of a
stream anchored at i sits at p(i) + 1 + s. That is exactly the position the token would have in
the plain sequence x_<=i, <sot>, c_1, ..., so the packed pass reproduces that plain sequence
(the reference's rule: thought token s after position i at i+s, with <sot> as s=1).
With `talk_at` = k (thought.talk_positions=resume, k = t + 1, the index of <eot>), stream tokens
s >= k sit at p(i) + 1 + (s - k) instead: the talk part (<eot>, x_{i+1}, ...) takes the positions
the text would have had without the thought, as if <eot> were one pause token after x_i.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

BASE = -1


@dataclass
class SplitStructure:
    """The regular shape of a layout that the split backend relies on (see Layout.structure)."""
    n: int
    n_base_queries: int
    n_streams: int
    queries_per_stream: int
    own_keys: torch.Tensor        # (M, Lk) key positions of each stream's own tokens
    own_visible: torch.Tensor     # (Lq, Lk) bool: own key idx <= query idx
    base_visible: torch.Tensor    # (B, M, n) bool: real base keys up to the stream's anchor


_create_block_mask_compiled = None


def _compiled_create_block_mask():
    """torch.compile(create_block_mask), built once per process (GPU block masks)."""
    global _create_block_mask_compiled
    if _create_block_mask_compiled is None:
        from torch.nn.attention.flex_attention import create_block_mask
        _create_block_mask_compiled = torch.compile(create_block_mask)
    return _create_block_mask_compiled


def base_positions(base_valid: torch.Tensor) -> torch.Tensor:
    """(B, n) bool -> (B, n) long position ids: number of valid tokens strictly before each one."""
    return (base_valid.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Layout:
    """Token tags of one forward pass. Shapes: B rows, n base tokens, M streams per row,
    Sq queries, Sk keys."""

    base_valid: torch.Tensor
    """(B, n) bool: True for real tokens, False for padding."""
    anchor: torch.Tensor
    """(B, M) long: base index after which each stream starts (M may be 0)."""
    q_stream: torch.Tensor
    """(Sq,) long: stream of each query, -1 for base tokens."""
    q_idx: torch.Tensor
    """(Sq,) long: base index (base queries) or index inside the stream."""
    k_stream: torch.Tensor
    """(Sk,) long: like q_stream, for keys."""
    k_idx: torch.Tensor
    """(Sk,) long: like q_idx, for keys."""
    backend: str = "dense"
    """Name of the attention backend that computes this layout (see attention.py)."""
    talk_at: int | None = None
    """None: stream tokens sit one position after another (the paper). k: stream tokens from
    index k on restart at the anchor's next position (see the module docstring)."""
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- constructors -------------------------------------------------------------------
    @staticmethod
    def _stream_tags(num_streams: int, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tags of `length` tokens (idx start..start+length-1) of every stream, stream-major."""
        stream = torch.arange(num_streams, device=device).repeat_interleave(length)
        idx = torch.arange(start, start + length, device=device).repeat(num_streams)
        return stream, idx

    @classmethod
    def base_only(cls, base_valid: torch.Tensor, backend: str = "dense") -> "Layout":
        """A plain causal pass over the base tokens (padding-aware)."""
        B, n = base_valid.shape
        dev = base_valid.device
        tag_s = torch.full((n,), BASE, dtype=torch.long, device=dev)
        tag_i = torch.arange(n, device=dev)
        anchor = torch.zeros(B, 0, dtype=torch.long, device=dev)
        return cls(base_valid, anchor, tag_s, tag_i, tag_s, tag_i, backend)

    @classmethod
    def packed(cls, base_valid: torch.Tensor, anchor: torch.Tensor, stream_len: int,
               backend: str = "dense", talk_at: int | None = None) -> "Layout":
        """Base tokens, then each of the M streams (stream_len tokens) contiguously.
        Sequence length S = n + M * stream_len; queries == keys."""
        B, n = base_valid.shape
        M = anchor.shape[1]
        dev = base_valid.device
        s_st, s_idx = cls._stream_tags(M, 0, stream_len, dev)
        tag_s = torch.cat([torch.full((n,), BASE, dtype=torch.long, device=dev), s_st])
        tag_i = torch.cat([torch.arange(n, device=dev), s_idx])
        return cls(base_valid, anchor, tag_s, tag_i, tag_s, tag_i, backend, talk_at)

    def extend(self, start: int, length: int) -> "Layout":
        """Layout of the next KV-cached step: `length` new tokens (idx start..start+length-1)
        for every stream, stream-major, appended after the keys of this layout."""
        M = self.anchor.shape[1]
        q_s, q_i = self._stream_tags(M, start, length, self.anchor.device)
        return Layout(self.base_valid, self.anchor, q_s, q_i,
                      torch.cat([self.k_stream, q_s]), torch.cat([self.k_idx, q_i]), self.backend,
                      self.talk_at)

    def with_streams(self, anchor: torch.Tensor, talk_at: int | None = None) -> "Layout":
        """The same keys with a set of stream anchors attached (used after a base-only prefill)."""
        return Layout(self.base_valid, anchor, self.q_stream, self.q_idx, self.k_stream, self.k_idx,
                      self.backend, talk_at)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def num_streams(self) -> int:
        return self.anchor.shape[1]

    def position_ids(self) -> torch.Tensor:
        """(B, Sq) long position ids of the queries (see module docstring)."""
        pos = base_positions(self.base_valid)                                  # (B, n)
        is_base = self.q_stream == BASE                                        # (Sq,)
        base_part = pos[:, self.q_idx.clamp(max=pos.shape[1] - 1)]             # (B, Sq)
        if self.num_streams == 0:
            return base_part
        st = self.q_stream.clamp(min=0)
        anchor_pos = pos.gather(1, self.anchor)                                # (B, M)
        s = self.q_idx if self.talk_at is None else \
            torch.where(self.q_idx >= self.talk_at, self.q_idx - self.talk_at, self.q_idx)
        stream_part = anchor_pos[:, st] + 1 + s                                # (B, Sq)
        return torch.where(is_base, base_part, stream_part)

    def query_anchor(self) -> torch.Tensor:
        """(B, Sq) long: the last base index each query may see (its own index for base queries)."""
        is_base = self.q_stream == BASE
        if self.num_streams == 0:
            return self.q_idx.expand(self.base_valid.shape[0], -1)
        st_anchor = self.anchor[:, self.q_stream.clamp(min=0)]                 # (B, Sq)
        return torch.where(is_base, self.q_idx, st_anchor)

    def visible(self) -> torch.Tensor:
        """(B, Sq, Sk) bool: the full visibility matrix. O(Sq*Sk): the dense reference."""
        if "visible" in self._memo:
            return self._memo["visible"]
        B, n = self.base_valid.shape
        k_base = self.k_stream == BASE                                         # (Sk,)
        k_valid = self.base_valid[:, self.k_idx.clamp(max=n - 1)] & k_base     # (B, Sk)
        qa = self.query_anchor()                                               # (B, Sq)
        see_base = k_valid[:, None, :] & (self.k_idx[None, None, :] <= qa[:, :, None])
        own = (self.k_stream[None, :] == self.q_stream[:, None]) & ~k_base[None, :]
        own = own & (self.k_idx[None, :] <= self.q_idx[:, None])               # (Sq, Sk)
        # A base query always sees itself: a padding query would otherwise see nothing
        # (a fully masked softmax row is NaN); padding outputs are never used.
        self_base = (self.q_stream[:, None] == BASE) & k_base[None, :] & (self.k_idx[None, :] == self.q_idx[:, None])
        vis = see_base | (own | self_base)[None]
        self._memo["visible"] = vis
        return vis

    def structure(self) -> SplitStructure:
        """Describe the layout as [base queries][M streams x Lq queries, stream-major] against
        keys [n base keys][stream keys, any order, the same idx set for every stream]; raise if it
        is not of that shape. Memoised."""
        if "structure" in self._memo:
            return self._memo["structure"]
        B, n = self.base_valid.shape
        dev = self.k_idx.device
        if len(self.k_stream) < n or bool((self.k_stream[:n] != BASE).any()) or \
                not torch.equal(self.k_idx[:n], torch.arange(n, device=dev)):
            raise ValueError("split attention needs the n base tokens as the first keys")
        nbq = int((self.q_stream == BASE).sum())
        if bool((self.q_stream[:nbq] != BASE).any()):
            raise ValueError("split attention needs base queries before stream queries")
        M = self.num_streams
        qs, qi = self.q_stream[nbq:], self.q_idx[nbq:]
        Lq = len(qs) // M if M else 0
        ks, ki = self.k_stream[n:], self.k_idx[n:]
        if M:
            if len(qs) != M * Lq or not torch.equal(qs, torch.arange(M, device=dev).repeat_interleave(Lq)) \
                    or bool((qi.view(M, Lq) != qi[:Lq]).any()):
                raise ValueError("split attention needs stream queries grouped by stream, same tokens per stream")
            order = torch.argsort(ks * (int(ki.max()) + 1 if len(ki) else 1) + ki)
            Lk = len(ks) // M
            own = (order + n).view(M, Lk)
            own_idx = ki[order].view(M, Lk)
            if len(ks) != M * Lk or bool((ks[order].view(M, Lk) != torch.arange(M, device=dev)[:, None]).any()) \
                    or bool((own_idx != own_idx[:1]).any()):
                raise ValueError("split attention needs the same number of own keys for every stream")
            own_visible = own_idx[0][None, :] <= qi[:Lq][:, None]                 # (Lq, Lk)
            kpos = torch.arange(n, device=dev)
            base_visible = self.base_valid[:, None, :] & (kpos[None, None, :] <= self.anchor[:, :, None])
        else:
            own = torch.zeros(0, 0, dtype=torch.long, device=dev)
            own_visible = torch.zeros(0, 0, dtype=torch.bool, device=dev)
            base_visible = torch.zeros(B, 0, n, dtype=torch.bool, device=dev)
        st = SplitStructure(n, nbq, M, Lq, own, own_visible, base_visible)
        self._memo["structure"] = st
        return st

    def block_mask(self, n_q: int, n_k: int, device) -> "object":
        """FlexAttention BlockMask of this layout's visibility rule (the same rule as `visible`,
        evaluated per (query, key) from the tags, never stored as an (Sq, Sk) tensor). Memoised."""
        key = ("block_mask", n_q, n_k, str(device))
        if key not in self._memo:
            from torch.nn.attention.flex_attention import create_block_mask
            B, n = self.base_valid.shape
            q_s, q_i, k_s, k_i = self.q_stream, self.q_idx, self.k_stream, self.k_idx
            valid, anchor = self.base_valid, self.anchor
            M = self.num_streams

            def mask_mod(b, h, q, k):
                qs, qi, ks, ki = q_s[q], q_i[q], k_s[k], k_i[k]
                k_base = ks == BASE
                if M:
                    qa = torch.where(qs == BASE, qi, anchor[b, qs.clamp(min=0)])
                else:
                    qa = qi
                see_base = k_base & valid[b, ki.clamp(max=n - 1)] & (ki <= qa)
                own = (ks == qs) & ~k_base & (ki <= qi)
                self_base = (qs == BASE) & k_base & (ki == qi)     # a padding query sees itself
                return see_base | own | self_base

            make = create_block_mask
            if torch.device(device).type == "cuda":
                # eager create_block_mask evaluates mask_mod over the whole (B, n_q, n_k) grid
                # with int64 temporaries (GBs for a SmolLM2-360M learn layout); compiled, it is
                # one fused kernel (docs/PERFORMANCE.md)
                make = _compiled_create_block_mask()
            self._memo[key] = make(mask_mod, B, None, n_q, n_k, device=device)
        return self._memo[key]

    def base_additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, n_base_queries, n) float mask of the base queries against the base keys."""
        key = ("base_additive", dtype)
        if key not in self._memo:
            B, n = self.base_valid.shape
            qi = self.q_idx[self.q_stream == BASE]                                   # (nq,)
            kpos = torch.arange(n, device=qi.device)
            vis = self.base_valid[:, None, :] & (kpos[None, None, :] <= qi[None, :, None])
            vis = vis | (kpos[None, None, :] == qi[None, :, None])     # a padding query sees itself
            m = torch.zeros(vis.shape, dtype=dtype, device=vis.device)
            m.masked_fill_(~vis, torch.finfo(dtype).min)
            self._memo[key] = m[:, None]
        return self._memo[key]

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, Sq, Sk) float mask: 0 where visible, finfo.min elsewhere. A float mask (not a
        boolean one) is what matched the reference under every HF attention implementation."""
        key = ("additive", dtype)
        if key not in self._memo:
            vis = self.visible()
            m = torch.zeros(vis.shape, dtype=dtype, device=vis.device)
            m.masked_fill_(~vis, torch.finfo(dtype).min)
            self._memo[key] = m[:, None]
        return self._memo[key]
