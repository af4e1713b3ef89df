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
the same positions scored again with a thought sampled for another sequence. `token_focus` and
`focus_summary` split the same numbers by which tokens are predicted (e.g. the results of sums,
where a thought could compute and a single forward pass may not). Pure tensor code: the caller
runs the model (trainer: through the DeepSpeed engine; evaluate.py: a loaded model).
"""
from __future__ import annotations

import math
import re

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


TOKEN_TEXT_CONTEXT = 8
"""token_focus: tokens decoded before each token to find its own text (a character split over
more bytes than this many tokens is lost; the cost per token is two decodes of this many)."""


def token_texts(row: list[int], tokenizer) -> list[str]:
    """Each token's own text: what decoding it adds to decoding the TOKEN_TEXT_CONTEXT tokens
    before it, so that a space a tokenizer attaches to a word (SentencePiece's leading space)
    stays with its token; a token that ends inside a multi-byte character gets "" and the token
    that completes it gets the whole character. Joined, the texts are the decoded sequence."""
    out = []
    for j in range(len(row)):
        a = max(0, j - TOKEN_TEXT_CONTEXT)
        before = tokenizer.decode(row[a:j]).rstrip("\ufffd") if j > a else ""
        both = tokenizer.decode(row[a:j + 1])
        piece = both[len(before):] if both.startswith(before) else ""
        out.append("" if piece.endswith("\ufffd") else piece)
    return out


def token_focus(ids: torch.Tensor, tokenizer, pattern: str) -> torch.Tensor:
    """(D, n) token ids -> (D, n) bool: the tokens whose own text (token_texts) overlaps a match
    of the regular expression `pattern` (empty matches ignored) in the sequence's text."""
    rx = re.compile(pattern)
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for d, row in enumerate(ids.tolist()):
        pieces = token_texts(row, tokenizer)
        text = "".join(pieces)
        cum = [0] * (len(text) + 1)                  # cum[c]: characters before c inside a match
        inside = bytearray(len(text))
        for m in rx.finditer(text):
            inside[m.start():m.end()] = b"\x01" * (m.end() - m.start())
        for c in range(len(text)):
            cum[c + 1] = cum[c] + inside[c]
        start = 0
        for j, piece in enumerate(pieces):
            out[d, j] = cum[start + len(piece)] > cum[start]
            start += len(piece)
    return out


def focus_positions(token_in_focus: torch.Tensor, anchor: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(D, n) bool from token_focus, (D, P) anchors and validity of token_scores -> (D, P) bool:
    the valid positions whose scored token x_{i+1} is in focus."""
    n = token_in_focus.shape[1]
    return token_in_focus.gather(1, (anchor.long() + 1).clamp(max=n - 1)) & valid.bool()


def _per_sequence_or_none(values: torch.Tensor, where: torch.Tensor) -> list:
    """(D, P), (D, P) bool -> each sequence's mean over `where`, None where it has no position."""
    w = where.double()
    cnt = w.sum(1)
    return [float(v) / float(c) if c > 0 else None for v, c in zip((values * w).sum(1), cnt)]


def focus_summary(s: dict[str, torch.Tensor], focus: torch.Tensor, other: dict[str, torch.Tensor] | None = None) -> dict:
    """token_scores (D, P) split by `focus` (focus_positions): NLL without and with thoughts and
    the gain on the focus tokens and on the others, each with a 95% CI over the sequences that
    have such tokens; the gain on focus tokens minus elsewhere, paired by sequence; each
    sequence's NLL on its focus tokens (None where it has none), in order, for comparing runs
    paired; with `other` (the same positions with another sequence's thoughts, content_effect),
    the content effect on the focus tokens and elsewhere (and per sequence on the focus tokens)."""
    valid = s["valid"].bool()
    f, rest = focus.bool() & valid, valid & ~focus.bool()
    gain = s["mixed"] - s["base"]
    out: dict = {"tokens": int(f.sum()), "sequences": int(f.any(1).sum()), "tokens_outside": int(rest.sum())}
    out["nll_base"] = mean_ci(per_sequence(-s["base"], f))[0]
    out["nll_mixed"] = mean_ci(per_sequence(-s["mixed"], f))[0]
    out["nll_base_outside"] = mean_ci(per_sequence(-s["base"], rest))[0]
    out["nll_mixed_outside"] = mean_ci(per_sequence(-s["mixed"], rest))[0]
    for name, where in (("gain", f), ("gain_outside", rest)):
        m, lo, hi = mean_ci(per_sequence(gain, where))
        out[name], out[name + "_ci95"] = m, [lo, hi]
    pairs = [a - b for a, b in zip(_per_sequence_or_none(gain, f), _per_sequence_or_none(gain, rest))
             if a is not None and b is not None]
    m, lo, hi = mean_ci(torch.tensor(pairs, dtype=torch.float64))
    out["gain_focus_minus_outside"], out["gain_focus_minus_outside_ci95"] = m, [lo, hi]
    out["sequence_nll_base"] = _per_sequence_or_none(-s["base"], f)
    out["sequence_nll_thoughts"] = _per_sequence_or_none(-s["mixed"], f)
    if other is not None:
        ok = other["valid"].bool()
        diff = s["mixed"] - other["mixed"]
        for name, where in (("content_gain", f & ok), ("content_gain_outside", rest & ok)):
            m, lo, hi = mean_ci(per_sequence(diff, where))
            out[name], out[name + "_ci95"] = m, [lo, hi]
        out["nll_mixed_other"] = mean_ci(per_sequence(-other["mixed"], f & ok))[0]
        out["content_gain_sequences"] = _per_sequence_or_none(diff, f & ok)        # for pooling runs
    return out


def focus_line(pattern: str, m: dict) -> str:
    """One line: focus_summary of the tokens matching `pattern`."""
    lo, hi = m["gain_ci95"]
    olo, ohi = m["gain_outside_ci95"]
    txt = (f"tokens matching {pattern!r} ({m['tokens']} in {m['sequences']} sequences): NLL {m['nll_base']:.4f} "
           f"without thoughts, {m['nll_mixed']:.4f} with; gain {m['gain']:+.4f} (95% CI {lo:+.4f}..{hi:+.4f}); "
           f"on the other {m['tokens_outside']} tokens {m['gain_outside']:+.4f} ({olo:+.4f}..{ohi:+.4f})")
    if "content_gain" in m:
        clo, chi = m["content_gain_ci95"]
        txt += (f"; own thoughts against another sequence's on them {m['content_gain']:+.4f} "
                f"({clo:+.4f}..{chi:+.4f})")
    return txt


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
    txt += f"; {m.get('talk_len', 'K')}-token window {m['gain_win']:+.4f} ({wlo:+.4f}..{whi:+.4f}); w {m['mix_w']:.4f}"
    if "focus_gain" in m:      # the trainer's eval.focus, flattened
        flo, fhi = m["focus_gain_ci95"]
        txt += (f"; on the {m['focus_tokens']} tokens matching {m['focus_pattern']!r} {m['focus_gain']:+.4f} "
                f"({flo:+.4f}..{fhi:+.4f}), elsewhere {m['focus_gain_outside']:+.4f}")
    return txt


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
