"""Quiet-STaR losses and rewards: pure tensor code (no model, no deepspeed).

Shapes: B rows, M = P*r streams per row (stream m = p*r + k: thought k after the p-th position),
t thought tokens, K talk tokens, n base tokens.

    reward(i,k)  = logp_talk(i,k) - mean_k' logp_talk(i,k')            (no gradient)
    L_talk       = - sum_valid logp_talk(i,k)          / (N_streams * K)
    L_base       = - sum_valid log p(x_{i+1} | x_<=i)  / N_base
    L_reinforce  = - sum_valid max(reward, 0) * sum_s log p(c_s) / (N_streams * t)
    L            = w_talk * L_talk + w_base * L_base + beta * L_reinforce

N_streams and N_base are counts of valid terms. They default to the counts in the tensors given,
and can be passed in (`Normalizer`) when one optimizer step is split into chunks, so that the sum
of the chunks' losses is the loss of the whole step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits, (...) long targets -> (...) log softmax(logits / temperature)[target],
    computed in at least float32."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


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
                      clip_negative: bool, norm: Normalizer) -> dict[str, torch.Tensor]:
    """thought_logp (B, M, t), talk_logp (B, M, K), base_logp (B, n-1), valid (B, M),
    base_mask (B, n-1), rewards (B, M) -> {"talk", "base", "reinforce"} scalar losses."""
    t, K = thought_logp.shape[-1], talk_logp.shape[-1]
    vf = valid.to(talk_logp.dtype)
    adv = rewards.detach().clamp(min=0) if clip_negative else rewards.detach()
    n_streams = max(norm.n_streams, 1.0)  # no valid stream: the terms are 0, not NaN
    talk = -(talk_logp.sum(-1) * vf).sum() / (n_streams * K)
    reinforce = -(adv * vf * thought_logp.sum(-1)).sum() / (n_streams * t)
    base = -(base_logp * base_mask.to(base_logp.dtype)).sum() / max(norm.n_base, 1.0)
    return {"talk": talk, "base": base, "reinforce": reinforce}


def total_loss(losses: dict[str, torch.Tensor], w_talk: float, w_base: float, beta: float) -> torch.Tensor:
    return w_talk * losses["talk"] + w_base * losses["base"] + beta * losses["reinforce"]


class _ChunkedLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[target] over row chunks, recomputing each chunk's logits in backward:
    at most (chunk, V) logits are alive at once, in forward and in backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, masked, chunk):
        N = h.shape[0]
        out = torch.empty(N, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        lse = torch.empty_like(out)
        for a in range(0, N, chunk):
            z = _chunk_logits(h[a:a + chunk], weight, bias, temperature, masked)
            lse[a:a + chunk] = torch.logsumexp(z, dim=-1)
            out[a:a + chunk] = z.gather(-1, targets[a:a + chunk, None]).squeeze(-1) - lse[a:a + chunk]
        ctx.save_for_backward(h, weight, bias, targets, lse, masked)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets, lse, masked = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        gh = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        gb = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        # Rows whose upstream gradient is 0 contribute nothing (typically half of the thought
        # tokens: REINFORCE with clipped negative rewards, invalid or padded streams): skip them,
        # i.e. skip their share of the three (rows x V x H) products of this backward.
        rows = grad_out.nonzero().squeeze(-1)
        for a in range(0, rows.numel(), chunk):
            idx = rows[a:a + chunk]
            hc, g = h.index_select(0, idx), grad_out.index_select(0, idx)
            z = _chunk_logits(hc, weight, bias, T, masked)
            # d/dz [z_t - lse] = onehot(t) - softmax(z); chain through z = (h W^T + b) / T
            dz = z.sub_(lse.index_select(0, idx)[:, None]).exp_().mul_(-g[:, None])      # in place: one buffer
            dz.scatter_add_(-1, targets.index_select(0, idx)[:, None], g[:, None])
            if T != 1.0:
                dz.div_(T)
            dz = dz.to(h.dtype)
            if gh is not None:
                gh.index_copy_(0, idx, dz @ weight)
            if gw is not None:
                gw.addmm_(dz.T, hc)
            if gb is not None:
                gb += dz.sum(0).to(gb.dtype)
        return gh, gw, gb, None, None, None, None


def _chunk_logits(h, weight, bias, temperature, masked):
    z = h @ weight.T
    if bias is not None:
        z = z + bias
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    z.index_fill_(-1, masked, float("-inf"))
    return z / temperature if temperature != 1.0 else z


def chunked_token_logprobs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           targets: torch.Tensor, masked: torch.Tensor, temperature: float = 1.0,
                           chunk: int = 1024) -> torch.Tensor:
    """(..., H) hidden states, (V, H) output weight, (...) targets -> (...) log-probs, equal to
    token_logprobs(h @ W^T + b with `masked` ids at -inf, targets, temperature), with no
    (all tokens x V) tensor alive at any time (chunks of `chunk` rows, recomputed in backward)."""
    shape = targets.shape
    out = _ChunkedLogprobs.apply(h.reshape(-1, h.shape[-1]), weight, bias, targets.reshape(-1),
                                 float(temperature), masked, int(chunk))
    return out.view(shape)
