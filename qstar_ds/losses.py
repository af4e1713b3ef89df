"""Quiet-STaR losses and rewards: pure tensor code (no model, no deepspeed).

Shapes: B rows, M = P*r streams per row (stream m = p*r + k: thought k after the p-th position),
t thought tokens, K talk tokens, n base tokens.

    reward(i,k)  = logp_talk(i,k) - mean_k' logp_talk(i,k')            (no gradient)
    L_talk       = - sum_valid logp_talk(i,k)          / (N_streams * K)
    L_read       = - sum_valid logp_read(i,k)          / (N_streams * K)   (post-thought state alone)
    L_base       = - sum_valid log p(x_{i+1} | x_<=i)  / N_base
    L_reinforce  = - sum_valid max(reward, 0) * sum_s log p(c_s) / (N_streams * t)
    L            = w_talk * L_talk + w_base * L_base + beta * L_reinforce + w_read * L_read

N_streams and N_base are counts of valid terms. They default to the counts in the tensors given,
and can be passed in (`Normalizer`) when one optimizer step is split into chunks, so that the sum
of the chunks' losses is the loss of the whole step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def stream_validity(base_valid: torch.Tensor, anchor: torch.Tensor, talk_len: int) -> torch.Tensor:
    """(B, n) bool, (B, M) long -> (B, M) bool: the stream's anchor is a real token and all K talk
    targets x_{i+1..i+K} exist and are real tokens (not past the end, not padding)."""
    n = base_valid.shape[1]
    offs = torch.arange(talk_len + 1, device=anchor.device)                   # 0..K
    idx = anchor[..., None] + offs                                             # (B, M, K+1)
    inside = idx < n
    real = base_valid.gather(1, idx.clamp(max=n - 1).flatten(1)).view(idx.shape)
    return (inside & real).all(-1)


def base_target_mask(base_valid: torch.Tensor) -> torch.Tensor:
    """(B, n) -> (B, n-1): which next-token targets x_{i+1} count in L_base."""
    return base_valid[:, :-1] & base_valid[:, 1:]


def compute_rewards(talk_logp_sum: torch.Tensor, valid: torch.Tensor, n_thoughts: int) -> torch.Tensor:
    """(B, M) summed talk log-probs -> (B, M) rewards (0 where invalid), baseline = mean over
    the r thoughts of the same position. Detached."""
    B, M = talk_logp_sum.shape
    x = talk_logp_sum.detach().view(B, M // n_thoughts, n_thoughts)
    r = (x - x.mean(-1, keepdim=True)).view(B, M)
    return torch.where(valid, r, torch.zeros_like(r))


@dataclass
class Normalizer:
    """Denominators of the losses (counts of valid terms in the whole optimizer step)."""
    n_streams: float
    n_base: float

    @classmethod
    def local(cls, valid: torch.Tensor, base_mask: torch.Tensor) -> "Normalizer":
        return cls(float(valid.sum()), float(base_mask.sum()))


def quiet_star_losses(thought_logp: torch.Tensor, talk_logp: torch.Tensor, base_logp: torch.Tensor,
                      valid: torch.Tensor, base_mask: torch.Tensor, rewards: torch.Tensor,
                      clip_negative: bool, norm: Normalizer, read_logp: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
    """thought_logp (B, M, t), talk_logp (B, M, K), base_logp (B, n-1), valid (B, M),
    base_mask (B, n-1), rewards (B, M), read_logp (B, M, K) or None -> {"talk", "base",
    "reinforce", "read"} scalar losses ("read" is 0 without read_logp)."""
    t, K = thought_logp.shape[-1], talk_logp.shape[-1]
    vf = valid.to(talk_logp.dtype)
    adv = rewards.detach().clamp(min=0) if clip_negative else rewards.detach()
    n_streams = max(norm.n_streams, 1.0)  # no valid stream: the terms are 0, not NaN
    talk = -(talk_logp.sum(-1) * vf).sum() / (n_streams * K)
    reinforce = -(adv * vf * thought_logp.sum(-1)).sum() / (n_streams * t)
    base = -(base_logp * base_mask.to(base_logp.dtype)).sum() / max(norm.n_base, 1.0)
    read = talk.new_zeros(()) if read_logp is None else -(read_logp.sum(-1) * vf).sum() / (n_streams * K)
    return {"talk": talk, "base": base, "reinforce": reinforce, "read": read}


def total_loss(losses: dict[str, torch.Tensor], w_talk: float, w_base: float, beta: float,
               w_read: float = 0.0) -> torch.Tensor:
    loss = w_talk * losses["talk"] + w_base * losses["base"] + beta * losses["reinforce"]
    return loss + w_read * losses["read"] if w_read else loss
