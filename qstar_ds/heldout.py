"""Held-out evaluation: does thinking make the model predict text it never trained on better?

For every held-out sequence and every position i whose K-token talk window fits, one thought is
sampled after x_i (at the evaluation temperature; in filler mode the filler thought is fed), and
on the same tokens we compare

    base   = log p_base(x_{i+1} | x_<=i)                       the model without thinking
    mixed  = log p_mixed(x_{i+1} | x_<=i, thought)             talk step 1 through the mixing head
    gain   = mixed - base                                      nats/token; > 0: the thought helped

and the same over the non-myopic window x_{i+1..i+K} (teacher-forced, summed, reported per
token). It comes from the rollout the trainer already runs (its prefill gives the base log-probs),
so it costs one rollout per held-out sequence. With an untrained mixing head (w = 0) the gain is
exactly 0 (model.mix_rule=prob: the mixed prediction is then read_mix at w = model.mix_init).

Aggregates (`summarize`): mean NLL with and without thoughts, the gain with a 95% confidence
interval over sequences (each sequence's mean gain is one observation), the gain by difficulty
(scored tokens sorted by their base NLL and cut into ten equal groups; "hard10" is the
hardest group), the gain at each sequence's first scored position apart from the rest (with
unpacked documents that token follows a document's first token, a format token such as a
title's "#", which a mixing head learns to correct without thinking) and the positions
where thinking helped most, and (`content_effect`) how much of the gain is the thought's content:
the same positions scored again with a thought sampled for another sequence. Pure tensor code: the caller runs the model (trainer: through the
DeepSpeed engine; evaluate.py: a loaded model).
"""
from __future__ import annotations

import math

import torch

Z95 = 1.96


def token_scores(base_logp: torch.Tensor, talk_logp: torch.Tensor | None, anchor: torch.Tensor,
                 valid: torch.Tensor, mix_w: torch.Tensor | None, talk_len: int | None = None,
                 read_logp: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """From one rollout with one thought per position: base_logp (B, n-1) base log-probs of
    x_{i+1}; talk_logp (B, P, K) mixed log-probs of x_{i+1..i+K}; anchor (B, P); valid (B, P);
    mix_w (B, P, K). -> per position (B, P): base, mixed (next token), base_win, mixed_win
    (K-token window, summed), w (mixing weight of talk step 1), valid; with read_logp (B, P, K)
    (the post-thought state alone) also "read", its log-prob of the next token. A model without
    thoughts (talk_logp and mix_w None, talk_len given): "mixed" is the base prediction, w = 0."""
    K = talk_logp.shape[-1] if talk_logp is not None else talk_len
    n1 = base_logp.shape[1]
    idx = (anchor[..., None] + torch.arange(K, device=anchor.device)).clamp(max=n1 - 1)   # (B, P, K)
    base_k = base_logp.gather(1, idx.flatten(1)).view(idx.shape)                          # (B, P, K)
    if talk_logp is None:
        talk_logp, mix_w = base_k, torch.zeros_like(base_k)
    out = {"base": base_k[..., 0].double(), "mixed": talk_logp[..., 0].double(),
           "base_win": base_k.sum(-1).double(), "mixed_win": talk_logp.sum(-1).double(),
           "w": mix_w[..., 0].double(), "valid": valid}
    if read_logp is not None:
        out["read"] = read_logp[..., 0].double()
    return out


def mean_ci(xs: torch.Tensor) -> tuple[float, float, float]:
    """(mean, low, high): normal 95% interval of the mean of the observations xs (D,)."""
    xs = xs.double()
    m = float(xs.mean()) if xs.numel() else float("nan")
    if xs.numel() < 2:
        return m, m, m
    h = Z95 * float(xs.std(unbiased=True)) / math.sqrt(xs.numel())
    return m, m - h, m + h


def per_sequence(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(D, P) values, (D, P) bool -> (D,) mean over each sequence's valid positions (sequences
    with none are dropped)."""
    v = valid.double()
    cnt = v.sum(1)
    keep = cnt > 0
    return ((values * v).sum(1)[keep] / cnt[keep])


def summarize(s: dict[str, torch.Tensor], talk_len: int, deciles: int = 10) -> dict:
    """Aggregates of token_scores over D sequences (tensors (D, P)). NLLs and gains in nats/token
    (the window ones divided by K). Gains are positive when thinking helps."""
    valid = s["valid"].bool()
    gain = s["mixed"] - s["base"]
    gain_win = (s["mixed_win"] - s["base_win"]) / talk_len
    out: dict = {"sequences": int((valid.sum(1) > 0).sum()), "tokens": int(valid.sum())}
    for name, x in (("nll_base", -s["base"]), ("nll_mixed", -s["mixed"]), ("gain", gain),
                    ("nll_base_win", -s["base_win"] / talk_len), ("nll_mixed_win", -s["mixed_win"] / talk_len),
                    ("gain_win", gain_win), ("mix_w", s["w"])):
        m, lo, hi = mean_ci(per_sequence(x, valid))
        out[name] = m
        if name.startswith("gain"):
            out[name + "_ci95"] = [lo, hi]
    first = first_valid(valid)
    for name, where in (("first", first), ("rest", valid & ~first)):
        m, lo, hi = mean_ci(per_sequence(gain, where))
        out[f"gain_{name}"], out[f"gain_{name}_ci95"] = m, [lo, hi]
    # difficulty: scored tokens sorted by base NLL, cut into `deciles` groups of equal size
    nll = (-s["base"])[valid]
    g = gain[valid]
    if nll.numel() >= deciles:
        groups = torch.tensor_split(torch.argsort(nll, stable=True), deciles)        # easiest first
        out["gain_by_decile"] = [float(g[idx].mean()) for idx in groups]
        out["nll_base_by_decile"] = [float(nll[idx].mean()) for idx in groups]
        m, lo, hi = mean_ci(g[groups[-1]])          # tokens as observations (an approximation)
        out["gain_hard10"], out["gain_hard10_ci95"] = m, [lo, hi]
        out["hard10_ratio"] = m / out["gain"] if out["gain"] != 0 else float("nan")
    return out


def content_effect(own: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """token_scores of the same sequences and positions, with each position's own thought (`own`)
    and with a thought sampled at the same position of another sequence (`other`): what the
    content of a thought about this text adds to the mixed prediction beyond a thought being
    there. Positive when the own thought predicts better; 95% CIs over sequences (paired)."""
    valid = own["valid"].bool() & other["valid"].bool()
    diff = own["mixed"] - other["mixed"]
    out: dict = {"nll_mixed_other": mean_ci(per_sequence(-other["mixed"], valid))[0],
                 "gain_other": mean_ci(per_sequence(other["mixed"] - other["base"], valid))[0],
                 "content_gain_sequences": per_sequence(diff, valid).tolist()}    # for pooling runs
    first = first_valid(valid)
    for name, where in (("content_gain", valid), ("content_gain_rest", valid & ~first)):
        m, lo, hi = mean_ci(per_sequence(diff, where))
        out[name], out[name + "_ci95"] = m, [lo, hi]
    return out


def mixture(draws: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """token_scores of the same sequences with k independently sampled thoughts per position ->
    the scores of the average of the k mixed predictions (probabilities averaged, not log-probs:
    p = (p_1 + ... + p_k) / k, for the next token and for the K-token window's joint
    probability); the base prediction is the same in every draw; w: the mean; thoughts: the first
    draw's. By Jensen, never worse than the mean log-prob of the draws."""
    if len(draws) == 1:
        return draws[0]
    log_k = math.log(len(draws))
    out = dict(draws[0])
    for key in ("mixed", "mixed_win", "read"):
        if key in out:
            out[key] = torch.logsumexp(torch.stack([d[key] for d in draws]), 0) - log_k
    out["w"] = torch.stack([d["w"] for d in draws]).mean(0)
    return out


def first_valid(valid: torch.Tensor) -> torch.Tensor:
    """(D, P) bool -> (D, P) bool: only each sequence's first valid position."""
    v = valid.bool()
    return v & (v.cumsum(1) == 1)


def sequence_nll(s: dict[str, torch.Tensor], with_thoughts: bool, skip_first: bool = False,
                 logp: torch.Tensor | None = None) -> torch.Tensor:
    """(D,) each sequence's mean NLL (nats/token) with or without thoughts (or of the log-probs
    `logp` (D, P), e.g. read_mix's): the paired values the experiment tool compares across arms
    (same held-out sequences, same tokens). `skip_first`: without each sequence's first scored
    position."""
    x = -(logp if logp is not None else s["mixed"] if with_thoughts else s["base"])
    valid = s["valid"].bool()
    v = (valid & ~first_valid(valid) if skip_first else valid).double()
    return (x * v).sum(1) / v.sum(1).clamp(min=1)


def read_mix(s: dict[str, torch.Tensor], w: float) -> torch.Tensor:
    """(D, P) log-probs of the next token under p = (1 - w) p_base + w p_read, a mixture of the
    two distributions with a fixed weight (no mixing head): a wrong thought costs at most
    -log(1 - w) nats, unlike the mixed hidden state (a mixture of logits), where a confident
    wrong thought costs up to w times its NLL."""
    if not 0 < w <= 1:
        raise ValueError(f"read_mix: w = {w} must be in (0, 1]")
    return torch.logaddexp(s["base"] + math.log1p(-w) if w < 1 else torch.full_like(s["base"], -math.inf),
                           s["read"] + math.log(w))


def top_positions(s: dict[str, torch.Tensor], thoughts: torch.Tensor, ids: torch.Tensor, tokenizer,
                  k: int = 8, context: int = 12, anchor: torch.Tensor | None = None, following: int = 4) -> list[dict]:
    """The k positions where the thought raised the next token's log-prob most, with `context`
    tokens before and the `following` true tokens after (the first one is the scored one)."""
    gain = (s["mixed"] - s["base"]).masked_fill(~s["valid"].bool(), float("-inf"))
    flat = gain.flatten()
    P = gain.shape[1]
    rows = []
    for f in torch.topk(flat, min(k, int(s["valid"].sum()))).indices.tolist():
        d, p = divmod(f, P)
        i = int(anchor[d, p]) if anchor is not None else p
        rows.append({"sequence": d, "position": i, "gain": float(flat[f]),
                     "context": tokenizer.decode(ids[d, max(0, i - context):i + 1].tolist()),
                     "next": tokenizer.decode(ids[d, i + 1:i + 1 + following].tolist()),
                     "thought": tokenizer.decode(thoughts[d, p].tolist())})
    return rows


def line(prefix: str, m: dict) -> str:
    """One line per evaluation: `prefix` and the summary `m`."""
    lo, hi = m["gain_ci95"]
    txt = (f"{prefix} held-out NLL {m['nll_base']:.4f} without thoughts, {m['nll_mixed']:.4f} with; "
           f"gain {m['gain']:+.4f} nats/token (95% CI {lo:+.4f}..{hi:+.4f}, {m['sequences']} sequences, "
           f"{m['tokens']} tokens)")
    if "gain_hard10" in m:
        txt += f"; hardest 10%: {m['gain_hard10']:+.4f}"
    wlo, whi = m["gain_win_ci95"]
    return txt + f"; {m.get('talk_len', 'K')}-token window {m['gain_win']:+.4f} ({wlo:+.4f}..{whi:+.4f}); w {m['mix_w']:.4f}"


def flat_metrics(m: dict, prefix: str = "eval/") -> dict:
    """Scalars for metrics.jsonl and wandb: lists become numbered keys, CIs _lo/_hi."""
    out = {}
    for k, v in m.items():
        if isinstance(v, list) and k.endswith("_ci95"):
            out[f"{prefix}{k[:-5]}_lo"], out[f"{prefix}{k[:-5]}_hi"] = float(v[0]), float(v[1])
        elif isinstance(v, list):
            out.update({f"{prefix}{k}_{i}": float(x) for i, x in enumerate(v)})
        elif isinstance(v, (int, float)):
            out[prefix + k] = v
    return out
