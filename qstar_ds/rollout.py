"""Rollout: sample r thoughts after every position (or a given subset), all streams together,
without grad.

The base prefix is encoded once (prefill) into a KV cache; each decoding step then feeds one
token to every stream (M = P*r streams per row) and appends its keys to the cache, with the
layout saying which cached keys each stream may see (layout.py). The last step feeds c_t, <eot>
and the K-1 teacher-forced talk inputs of every stream at once, which yields the talk states; the
mixing head turns them into log p_talk, and the rewards follow.

Cost: one prefill of n tokens, then t+1 incremental steps; nothing is re-encoded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ThoughtConfig
from .layout import Layout
from .losses import compute_rewards, stream_validity
from .talk import read_logprobs, reward_logprobs, talk_logprobs, talk_targets


@dataclass
class Rollout:
    thoughts: torch.Tensor
    """(B, M, t) sampled thought tokens (markers excluded)."""
    anchor: torch.Tensor
    """(B, M) base index after which each stream starts; stream m = p*r + k."""
    talk_logp: torch.Tensor
    """(B, M, K) mixed log-probs of the talk targets after each thought."""
    mix_w: torch.Tensor
    """(B, M, K) mixing weights."""
    rewards: torch.Tensor
    """(B, M) talk log-prob (mixed, or read: thought.reward) minus the mean over the r thoughts
    of the position (0 if invalid)."""
    valid: torch.Tensor
    """(B, M) bool: whether the stream's talk window lies inside the real tokens."""
    base_logp: torch.Tensor | None = None
    """(B, n-1) base log-probs of x_{i+1} (only with base_logprobs=True: held-out evaluation)."""
    read_logp: torch.Tensor | None = None
    """(B, M, K) log-probs of the talk targets from the post-thought states alone (only with
    thought.reward = read or read_logprobs=True)."""
    thought_logp: torch.Tensor | None = None
    """(B, M, t) log-probs of the thought tokens under the thought policy at temperature 1 (only
    with thought_logprobs_too=True): how likely the model is to think a fed thought."""


def default_positions(n: int, talk_len: int, device=None) -> torch.Tensor:
    """Every position whose talk window fits in a sequence of n tokens: 0 .. n-K-1."""
    if n < talk_len + 1:
        raise ValueError(f"sequence length {n} is shorter than talk_len + 1 = {talk_len + 1}")
    return torch.arange(n - talk_len, device=device)


_GOLDEN, _MIX1, _MIX2 = (c - 2**64 for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def oracle_thoughts(ids: torch.Tensor, mask: torch.Tensor, anchor: torch.Tensor, marked: torch.Tensor | None,
                    t: int, filler_id: int) -> torch.Tensor:
    """thought.mode=oracle: (B, n) ids and mask, (B, M) anchors, (B, n) bool tokens marked by
    thought.oracle_focus (None: every token) -> (B, M, t): after anchor i whose next token x_{i+1}
    is marked, the text's own x_{i+1..i+t} (`filler_id` past the end and on padding); elsewhere the
    filler thought. A diagnostic that sees the future, never a method."""
    B, n = ids.shape
    src = torch.nn.functional.pad(ids.masked_fill(~mask.bool(), filler_id), (0, t), value=filler_id)  # (B, n + t)
    idx = anchor.long()[..., None] + 1 + torch.arange(t, device=ids.device)                          # (B, M, t)
    truth = src.gather(1, idx.flatten(1)).view(idx.shape)
    if marked is None:
        return truth
    on = marked.to(ids.device).gather(1, (anchor.long() + 1).clamp(max=n - 1)) & (anchor.long() + 1 < n)  # (B, M)
    return torch.where(on[..., None], truth, torch.full_like(truth, filler_id))


def _shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)          # logical, on a signed int64 tensor


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """int64 -> int64 hash (SplitMix64's output function, wrapping two's-complement arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def step_positions(n: int, talk_len: int, count: int, seed: int, step: int, device=None,
                   prefer: torch.Tensor | None = None) -> torch.Tensor:
    """The (count,) sorted positions that think at optimizer step `step` (thought.positions):
    every position whose talk window fits when count is 0 or all of them, else the `count` with
    the smallest hash of (seed, step, position): uniform over positions, the same on every rank
    and device, and a new draw at every step. `prefer` (n - talk_len,) bool (thought.position_focus):
    the preferred positions come first (the `count` of them with the smallest hash if there are
    more), the others fill what is left."""
    every = default_positions(n, talk_len)
    if count == 0 or count >= every.numel():
        return every.to(device)
    h = splitmix64(splitmix64(splitmix64(torch.tensor([seed], dtype=torch.long)) ^ step) ^ every)
    order = torch.argsort(h)
    if prefer is not None:
        order = order[torch.argsort((~prefer.cpu().bool())[order].to(torch.uint8), stable=True)]
    return every[order[:count]].sort().values.to(device)


@dataclass
class Noise:
    """Counter-based sampling noise: the uniform number that picks thought token s of thought k
    at position p of a sequence is a hash of (the sequence's key, p, k, s). It is the same
    whichever rank, batch or subset of positions computes it, so the rollout can be split over
    ranks by positions without changing a thought."""
    keys: torch.Tensor
    """(B,) int64: one per sequence (`sequence_noise`)."""

    def at(self, anchor: torch.Tensor, r: int, s: int) -> torch.Tensor:
        """anchor (B, M) positions of the streams (stream m = local position * r + k) -> (B*M, 1)."""
        k = torch.arange(anchor.shape[1], device=anchor.device) % r
        h = splitmix64(splitmix64(self.keys.to(anchor.device)[:, None] ^ (anchor * 1024 + k)) ^ s)
        return (_shift_right(h, 11).double() * 2.0**-53).reshape(-1, 1)


def sequence_noise(seed: int, step: int, seqs: list[int], device=None) -> Noise:
    """The rollout noise of global sequences `seqs` at optimizer step `step`."""
    base = splitmix64(splitmix64(torch.tensor([seed], dtype=torch.long)) ^ step)
    return Noise(splitmix64(base ^ torch.tensor(seqs, dtype=torch.long)).to(device))


def uniforms(rows: int, generator, device) -> torch.Tensor:
    """(rows, 1) uniform numbers from `generator`; a tensor of them (Noise.at); or a list of
    generators, one per equal block of rows (one per batch row): a batch then draws exactly what
    each row would draw alone."""
    if isinstance(generator, torch.Tensor):
        return generator.reshape(rows, 1).to(device)
    if isinstance(generator, (list, tuple)):
        per = rows // len(generator)
        return torch.cat([torch.rand(per, 1, generator=g, device=device) for g in generator])
    return torch.rand(rows, 1, generator=generator, device=device)


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int, generator) -> torch.Tensor:
    """(..., V) -> (...) samples from softmax(logits / temperature) (top_k: the k most likely
    only), seeded by `generator` (or a list of one generator per leading-dimension row).

    Inverse-CDF sampling: one softmax, one cumulative sum and one uniform number per row, ~6x
    cheaper on CPU than the Gumbel-max trick over a (streams x vocabulary) tensor (which draws V
    random numbers per row), and exact up to float32 rounding of the cumulative sum."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    if top_k > 0 and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    shape = z.shape[:-1]
    p = torch.softmax(z.reshape(-1, z.shape[-1]), dim=-1)                      # (R, V)
    c = p.cumsum(-1)
    u = uniforms(p.shape[0], generator, p.device) * c[:, -1:]
    # right=True: the first token whose cumulative probability exceeds u, so a zero-probability
    # token (masked marker, outside top-k) is never chosen
    idx = torch.searchsorted(c, u, right=True).clamp_(max=p.shape[1] - 1)     # (R, 1)
    # u rounded up to the total (probability ~1e-7): fall back to the most likely token
    idx = torch.where(p.gather(-1, idx) > 0, idx, p.argmax(-1, keepdim=True))
    return idx.reshape(shape)


def new_cache():
    """An empty KV cache with plain (full-attention) layers: a config-derived cache would crop
    sliding-window layers, which would drop keys our layouts address."""
    from transformers import DynamicCache
    return DynamicCache()


def sample_thoughts(model, cfg: ThoughtConfig, layout: Layout, cache,
                    generator: torch.Generator | None, fixed: torch.Tensor | None = None,
                    logprobs: list | None = None, partial: bool = False) -> tuple[torch.Tensor, Layout]:
    """Feed <sot>, c_1 .. c_{t-1} to every stream of `layout` (streams attached, nothing of them
    cached yet), one KV-cached step per token, sampling c_1 .. c_t (or teacher-forcing `fixed`
    (B, M, t), e.g. filler thoughts). -> (thoughts (B, M, t), the layout after the t steps).
    `logprobs`: a list that receives each step's (B, M) log-probs of c_s at temperature 1.
    `partial`: the entries of `fixed` below 0 are sampled, the others fed (the logits are computed
    at every step whatever the entries, so that every ZeRO-3 rank runs the same modules); a
    stream's sample does not depend on the other streams' tokens."""
    B, M = layout.anchor.shape
    tok = layout.anchor.new_full((B, M), model.sot_id)
    thoughts = []
    for s in range(cfg.thought_len):
        layout = layout.extend(s, 1)
        h = model.hidden(tok, layout, cache)                                   # (B, M, H)
        noise = generator.at(layout.anchor, cfg.n_thoughts, s) if isinstance(generator, Noise) else generator
        logits = model.logits(h) if fixed is None or logprobs is not None or partial else None  # (B, M, V)
        if fixed is None:
            tok = sample_tokens(logits, cfg.temperature, cfg.top_k, noise)
        elif partial:
            f = fixed[..., s]
            tok = torch.where(f >= 0, f, sample_tokens(logits, cfg.temperature, cfg.top_k, noise))
        else:
            tok = fixed[..., s]
        if logprobs is not None:
            logprobs.append(logits.float().log_softmax(-1).gather(-1, tok[..., None])[..., 0])
        thoughts.append(tok)
    return torch.stack(thoughts, dim=-1), layout


@torch.no_grad()
def rollout(model, cfg: ThoughtConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            positions: torch.Tensor | None = None, generator: torch.Generator | None = None,
            base_logprobs: bool = False, thoughts: torch.Tensor | None = None,
            read_logprobs_too: bool = False, thought_logprobs_too: bool = False, partial: bool = False) -> Rollout:
    """input_ids, attention_mask (B, n); positions (P,) base indices to think after (default:
    all whose talk window fits). Returns thoughts and their talk log-probs and rewards, and with
    `base_logprobs` the base model's next-token log-probs from the same prefill. `thoughts`
    (B, M, t): feed these instead of sampling (filler thoughts). `read_logprobs_too`: also the
    post-thought states' own log-probs of the talk targets (Rollout.read_logp);
    `thought_logprobs_too`: the thought tokens' log-probs under the policy (Rollout.thought_logp).
    `partial`: sample the entries of `thoughts` below 0, feed the others (sample_thoughts)."""
    B, n = input_ids.shape
    t, K, r = cfg.thought_len, cfg.talk_len, cfg.n_thoughts
    if positions is None:
        positions = default_positions(n, K, input_ids.device)
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= n):
        raise ValueError(f"positions must lie in [0, {n}); got min {int(positions.min())}, "
                         f"max {int(positions.max())}")
    base_valid = attention_mask.bool()
    anchor = positions.to(input_ids.device).repeat_interleave(r)[None].expand(B, -1).contiguous()
    M = anchor.shape[1]
    cache = new_cache()
    layout = Layout.base_only(base_valid, backend=cfg.attention_backend)
    h_base = model.hidden(input_ids, layout, cache)                           # (B, n, H) prefill
    layout = layout.with_streams(anchor, cfg.talk_at)

    fixed = thoughts
    thought_logp = [] if thought_logprobs_too else None
    thoughts, layout = sample_thoughts(model, cfg, layout, cache, generator, fixed, thought_logp, partial)  # (B, M, t)

    # c_t, <eot>, x_{i+1} .. x_{i+K-1}: stream tokens t .. t+K in one step.
    last = torch.cat([thoughts[..., -1:], input_ids.new_full((B, M, 1), model.eot_id),
                      talk_targets(input_ids, anchor, K - 1)], dim=-1)         # (B, M, K+1)
    layout = layout.extend(t, K + 1)
    h = model.hidden(last.flatten(1), layout, cache).unflatten(1, (M, K + 1))  # (B, M, K+1, H)
    talk_logp, mix_w = talk_logprobs(model, h_base, h[:, :, 1:], input_ids, anchor, cfg.loss_chunk_tokens)
    read_logp = None
    if read_logprobs_too or cfg.reward == "read":
        read_logp = read_logprobs(model, h[:, :, 1:], input_ids, anchor, cfg.loss_chunk_tokens)
    valid = stream_validity(base_valid, anchor, K)
    rewards = compute_rewards(reward_logprobs(cfg, talk_logp, read_logp), valid, r)
    base_logp = None
    if base_logprobs:
        base_logp = model.token_logprobs(h_base[:, :-1], input_ids[:, 1:], 1.0, cfg.loss_chunk_tokens)
    return Rollout(thoughts, anchor, talk_logp, mix_w, rewards, valid, base_logp, read_logp,
                   torch.stack(thought_logp, dim=-1) if thought_logprobs_too else None)
