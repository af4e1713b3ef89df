"""The talk window, shared by the rollout and the learn pass: the K true tokens after a position,
and their log-probs under the mixed prediction (the mixing head's blend of the base and
post-thought predictions, model.mix_rule) or under the post-thought state alone ("read"),
optionally recomputed in backward so that no vocabulary-sized logits are stored.
"""
from __future__ import annotations

import torch


def talk_targets(input_ids: torch.Tensor, anchor: torch.Tensor, talk_len: int, first: int = 1) -> torch.Tensor:
    """(B, n), (B, M) -> (B, M, K) tokens x_{i+first} .. x_{i+first+K-1}; indices past the end
    are clamped (such streams are invalid, see stream_validity)."""
    n = input_ids.shape[1]
    idx = (anchor[..., None] + first + torch.arange(talk_len, device=anchor.device)).clamp(max=n - 1)
    return input_ids.gather(1, idx.flatten(1)).view(idx.shape)


def maybe_checkpoint(model, fn, *args):
    """fn(*args), recomputed in backward instead of stored when model.loss_checkpointing is on:
    the vocabulary-sized logits inside `fn` are then never kept for backward."""
    if getattr(model, "loss_checkpointing", False) and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def logprobs(model, h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, chunk: int = 0) -> torch.Tensor:
    """(..., H) hidden states, (...) targets -> (...) log-probs under the model's output head
    (chunked over tokens when chunk > 0: that path recomputes by itself, no checkpoint needed)."""
    if chunk > 0:
        return model.token_logprobs(h, targets, temperature, chunk)
    return maybe_checkpoint(model, lambda h_: model.token_logprobs(h_, targets, temperature), h)


def talk_logprobs(model, h_base: torch.Tensor, h_thought: torch.Tensor, input_ids: torch.Tensor,
                  anchor: torch.Tensor, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """h_base (B, n, H), h_thought (B, M, K, H) -> (talk log-probs (B, M, K), mixing weights
    (B, M, K)). Talk step j mixes the thought state with the base state that predicts the same
    target x_{i+j}, i.e. base token i+j-1, by the model's mixing rule (model.mix_rule)."""
    B, n, H = h_base.shape
    K = h_thought.shape[2]
    idx = (anchor[..., None] + torch.arange(K, device=anchor.device)).clamp(max=n - 1)  # (B, M, K)
    hb = h_base.gather(1, idx.flatten(1)[..., None].expand(-1, -1, H)).view(*idx.shape, H)
    targets = talk_targets(input_ids, anchor, K)

    return maybe_checkpoint(model, lambda hb_, ht_: model.mixed_token_logprobs(hb_, ht_, targets, chunk),
                            hb, h_thought)


def read_logprobs(model, h_thought: torch.Tensor, input_ids: torch.Tensor, anchor: torch.Tensor,
                  chunk: int = 0) -> torch.Tensor:
    """h_thought (B, M, K, H) -> (B, M, K) log-probs of the talk targets x_{i+1..i+K} from the
    post-thought states alone (no mixing: what the model reads from its thought)."""
    return logprobs(model, h_thought, talk_targets(input_ids, anchor, h_thought.shape[2]), 1.0, chunk)


def reward_logprobs(cfg, talk_logp: torch.Tensor, read_logp: torch.Tensor | None) -> torch.Tensor:
    """(B, M, K) -> (B, M): the summed talk log-probs the rewards compare (thought.reward)."""
    return (read_logp if cfg.reward == "read" else talk_logp).sum(-1)
