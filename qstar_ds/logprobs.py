"""Log-probabilities of target tokens under the output head: plain, and vocabulary-chunked (an
autograd kernel that never holds more than (chunk, V) logits, in forward or backward). Pure
tensor code.
"""
from __future__ import annotations

import torch


def at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits -> float32 for softmax; float32/float64 unchanged."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits, (...) long targets -> (...) log softmax(logits / temperature)[target],
    computed in at least float32."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


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
