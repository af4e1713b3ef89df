"""The learn pass: one parallel, teacher-forced forward (with grad) over the packed layout.

Row b of the packed sequence (layout.py) is

    x_0 .. x_{n-1} | stream 0 | stream 1 | ... | stream M-1
    stream m = <sot>, c_1 .. c_t, <eot>, x_{i+1} .. x_{i+K-1}      (L = t + K + 1 tokens)

with i = anchor[b, m]. From its hidden states we read
  - base NLL: base token i predicts x_{i+1};
  - thought log-probs: stream token s-1 (<sot> for s = 1) predicts c_s, at the policy temperature;
  - talk: stream token t+j (<eot> for j = 1, x_{i+j-1} after) and base token i+j-1 are mixed by
    the mixing head to predict x_{i+j}, j = 1..K;
  - read (only when thought.w_read > 0 or the rewards come from it): stream token t+j alone
    predicts x_{i+j}.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ThoughtConfig
from .layout import Layout
from .losses import Normalizer, base_target_mask, compute_rewards, quiet_star_losses, stream_validity, total_loss
from .talk import logprobs, read_logprobs, reward_logprobs, talk_logprobs, talk_targets


def stream_ids(input_ids: torch.Tensor, anchor: torch.Tensor, thoughts: torch.Tensor,
               sot_id: int, eot_id: int, talk_len: int) -> torch.Tensor:
    """(B, n), (B, M), (B, M, t) -> (B, M, t+K+1) token ids of every stream."""
    B, M, _ = thoughts.shape
    sot = thoughts.new_full((B, M, 1), sot_id)
    eot = thoughts.new_full((B, M, 1), eot_id)
    talk_in = talk_targets(input_ids, anchor, talk_len - 1)                   # (B, M, K-1)
    return torch.cat([sot, thoughts, eot, talk_in], dim=-1)


@dataclass
class LearnOutput:
    loss: torch.Tensor
    """Scalar w_talk * talk + w_base * base + beta * reinforce."""
    losses: dict[str, torch.Tensor]
    """Each loss term ("talk", "base", "reinforce", "read")."""
    thought_logp: torch.Tensor
    """(B, M, t) log p(c_s | x_<=i, <sot>, c_<s) at the policy temperature (0 for streams with
    zero REINFORCE weight when the rewards were given and the loss is chunked: not computed)."""
    talk_logp: torch.Tensor
    """(B, M, K) mixed log-probs of the talk targets."""
    mix_w: torch.Tensor
    """(B, M, K) mixing weights."""
    base_logp: torch.Tensor
    """(B, n-1) base log-probs of x_{i+1}."""
    base_mask: torch.Tensor
    """(B, n-1) bool: base targets that count."""
    valid: torch.Tensor
    """(B, M) bool: streams that count."""
    rewards: torch.Tensor
    """(B, M) rewards used by the REINFORCE term."""
    read_logp: torch.Tensor | None = None
    """(B, M, K) log-probs of the talk targets from the post-thought states alone (when
    computed: thought.w_read > 0, or rewards from them)."""


def base_pass(model, cfg: ThoughtConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              norm: Normalizer | None = None) -> LearnOutput:
    """thought.mode=off: a plain causal-LM pass, the base next-token NLL alone with weight 1
    (continued pretraining, the control that shows what the data alone gives). No thoughts, so
    the stream-shaped outputs are empty (B, 0, ...)."""
    B, n = input_ids.shape
    base_valid = attention_mask.bool()
    h = model.hidden(input_ids, Layout.base_only(base_valid, backend=cfg.attention_backend))   # (B, n, H)
    base_logp = logprobs(model, h[:, :-1], input_ids[:, 1:], chunk=cfg.loss_chunk_tokens)    # (B, n-1)
    base_mask = base_target_mask(base_valid)
    n_base = norm.n_base if norm is not None else float(base_mask.sum())
    base = -(base_logp * base_mask.to(base_logp.dtype)).sum() / max(n_base, 1.0)
    zero = base.new_zeros(())
    empty = base_logp.new_zeros(B, 0)
    return LearnOutput(base, {"talk": zero, "base": base, "reinforce": zero, "read": zero}, empty[..., None].expand(B, 0, cfg.thought_len),
                       empty[..., None].expand(B, 0, cfg.talk_len), empty[..., None].expand(B, 0, cfg.talk_len),
                       base_logp, base_mask, empty.bool(), empty)


def learn_pass(model, cfg: ThoughtConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               anchor: torch.Tensor, thoughts: torch.Tensor, rewards: torch.Tensor | None = None,
               norm: Normalizer | None = None, base_loss: bool = True) -> LearnOutput:
    """input_ids, attention_mask (B, n); anchor (B, M); thoughts (B, M, t) sampled tokens.
    `rewards` (B, M) default to this pass's own (detached) talk log-probs minus the mean over
    the r thoughts of a position (needs all r thoughts of each position, consecutive);
    `norm` defaults to the counts of valid terms in this call. `base_loss=False` skips the base
    NLL (a chunk whose sequence's base loss another chunk already counts)."""
    B, n = input_ids.shape
    M, t, K = anchor.shape[1], thoughts.shape[-1], cfg.talk_len
    base_valid = attention_mask.bool()
    L = t + K + 1
    layout = Layout.packed(base_valid, anchor, L, backend=cfg.attention_backend, talk_at=cfg.talk_at)
    ids = torch.cat([input_ids, stream_ids(input_ids, anchor, thoughts, model.sot_id, model.eot_id, K)
                     .flatten(1)], dim=1)                                      # (B, n + M*L)
    h = model.hidden(ids, layout)                                              # (B, S, H)
    h_base, h_st = h[:, :n], h[:, n:].unflatten(1, (M, L))                     # (B,n,H), (B,M,L,H)

    # Computed even when not counted (base_loss=False): under ZeRO-3 every rank must call the
    # same modules in the same order, whatever its chunk.
    ch = cfg.loss_chunk_tokens
    base_logp = logprobs(model, h_base[:, :-1], input_ids[:, 1:], chunk=ch)          # (B, n-1)
    base_mask = base_target_mask(base_valid) & base_loss
    valid = stream_validity(base_valid, anchor, K)
    if rewards is not None and ch > 0:
        # Rewards known up front (the trainer's case): a thought whose REINFORCE weight is 0
        # (clipped negative reward, invalid stream: typically half of them) adds nothing to the
        # loss, so its t vocabulary-sized log-probs are not computed; its thought_logp is 0.
        adv = rewards.clamp(min=0) if cfg.clip_negative_rewards else rewards
        sel = ((adv != 0) & valid).nonzero(as_tuple=True)
        # called even with no row selected: under ZeRO-3 every rank runs the same modules
        sub = logprobs(model, h_st[:, :, :t][sel], thoughts[sel], cfg.policy_temperature, ch)   # (S, t)
        thought_logp = sub.new_zeros(B, M, t).index_put(sel, sub)                          # (B, M, t)
    else:
        thought_logp = logprobs(model, h_st[:, :, :t], thoughts, cfg.policy_temperature, ch)  # (B, M, t)
    talk_logp, mix_w = talk_logprobs(model, h_base, h_st[:, :, t + 1:], input_ids, anchor, ch)
    read_logp = None                                                           # (B, M, K)
    if cfg.w_read > 0 or (rewards is None and cfg.reward == "read"):
        read_logp = read_logprobs(model, h_st[:, :, t + 1:], input_ids, anchor, ch)

    if rewards is None:
        rewards = compute_rewards(reward_logprobs(cfg, talk_logp, read_logp), valid, cfg.n_thoughts)
    if norm is None:
        norm = Normalizer.local(valid, base_mask)
    losses = quiet_star_losses(thought_logp, talk_logp, base_logp, valid, base_mask, rewards,
                               cfg.clip_negative_rewards, norm, read_logp if cfg.w_read > 0 else None)
    loss = total_loss(losses, cfg.w_talk, cfg.w_base, cfg.beta, cfg.w_read)
    return LearnOutput(loss, losses, thought_logp, talk_logp, mix_w, base_logp, base_mask, valid, rewards, read_logp)
