"""Generation with thoughts, KV-cached.

For every new token the model first thinks, then talks:

    think: feed <sot>, c_1 .. c_{t-1} one token per step (sampling c_1 .. c_t), then c_t and
           <eot> together; the hidden state at <eot> is the post-thought state
    talk:  mix it with the base state of the last token through the mixing head and sample the
           next token from the mixed distribution (exactly the learn pass's talk distribution
           for the first talk token, see tests/test_generate.py)

The KV cache holds only base tokens between tokens: a thought appends t+2 keys per row, which are
dropped again (`cache.crop`) once the token is chosen; later tokens never see earlier thoughts
(the Quiet-STaR visibility rule), so nothing is re-run. Cost per generated token: t+1 thought
steps + 1 step for the new token, each one incremental forward of the rows; independent of the
prefix length except for attention reading the cached keys.

`think_threshold` (the paper's "think only when it helps" future work) decides per row and token
from the base distribution before thinking: rows whose base next-token entropy (nats) is below
the threshold take the base distribution and skip the thought (when no row of the batch needs a
thought, the thought steps are not run at all).

    python -m qstar_ds.generate --model smollm2 --prompt "Q: 2+3*4 =" --max_new_tokens 32 --show_thoughts
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch

from .config import ConfigError, ThoughtConfig, _require
from .layout import BASE, Layout
from .logprobs import at_least_fp32
from .rollout import new_cache, sample_thoughts, sample_tokens


@dataclass
class GenerateConfig:
    """How tokens are generated (thought settings live in ThoughtConfig)."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens per row."""
    temperature: float = 0.0
    """Sampling temperature of the generated (talk) tokens; 0 = greedy."""
    top_k: int = 0
    """If > 0, sample generated tokens from the top_k most likely only."""
    thoughts: bool = True
    """Think before every token (False: the plain base model, bit for bit HF greedy/sampling)."""
    think_threshold: float | None = None
    """Think only where the base next-token entropy (nats) is >= this; None = always think."""
    stop: list[str] = field(default_factory=list)
    """A row stops once its generated text contains one of these strings (EOS always stops)."""

    def __post_init__(self):
        _require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens",
                 self.max_new_tokens, "must be an integer >= 1")
        _require(self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0 = greedy)")
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k, "must be an integer >= 0")
        _require(self.think_threshold is None or self.think_threshold >= 0, "think_threshold",
                 self.think_threshold, "must be >= 0 (an entropy in nats) or None")


@dataclass
class Generation:
    tokens: torch.Tensor
    """(B, T) generated ids; after a row's stop: the pad id."""
    lengths: torch.Tensor
    """(B,) generated tokens per row, the stopping token included."""
    thoughts: torch.Tensor | None
    """(B, T, t) the thought sampled before each token (meaningful where `thought_mask`)."""
    thought_mask: torch.Tensor
    """(B, T) bool: the token was chosen from the mixed (post-thought) distribution."""
    mix_w: torch.Tensor
    """(B, T) mixing weight of the thought (0 where no thought)."""
    scores: torch.Tensor | None = None
    """(B, T, V) float32 log-probs each token was chosen from (with return_scores)."""
    seconds: float = 0.0
    """Wall time of the generation loop (prefill included)."""

    @property
    def think_rate(self) -> float:
        """Share of generated tokens that were preceded by a thought."""
        real = torch.arange(self.tokens.shape[1], device=self.lengths.device)[None] < self.lengths[:, None]
        return float(self.thought_mask[real].float().mean()) if bool(real.any()) else 0.0

    @property
    def tokens_per_s(self) -> float:
        return float(self.lengths.sum()) / max(self.seconds, 1e-9)


def base_step_layout(base_valid: torch.Tensor, start: int, backend: str) -> Layout:
    """Queries: base tokens start .. n-1 of base_valid (B, n); keys: all n base tokens (the
    cached ones first, then these)."""
    n = base_valid.shape[1]
    dev = base_valid.device
    idx = torch.arange(n, device=dev)
    tags = torch.full((n,), BASE, dtype=torch.long, device=dev)
    anchor = torch.zeros(base_valid.shape[0], 0, dtype=torch.long, device=dev)
    return Layout(base_valid, anchor, tags[start:], idx[start:], tags, idx, backend)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (...) entropy in nats (masked -inf entries contribute 0)."""
    logp = torch.log_softmax(at_least_fp32(logits), dim=-1)
    return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)


@torch.no_grad()
def think(model, cfg: ThoughtConfig, cache, base_valid: torch.Tensor, anchor: torch.Tensor,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One thought per stream. `cache` holds exactly the keys of the n base tokens of base_valid
    (B, n); anchor (B, M) base index each stream thinks after. Returns thoughts (B, M, t) and the
    hidden state at <eot> (B, M, H); the cache is cropped back to the n base keys."""
    B, n = base_valid.shape
    M, t = anchor.shape[1], cfg.thought_len
    layout = Layout.base_only(base_valid, cfg.attention_backend).with_streams(anchor, cfg.talk_at)
    try:
        thoughts, layout = sample_thoughts(model, cfg, layout, cache, generator)   # (B, M, t)
        last = torch.stack([thoughts[..., -1], torch.full_like(thoughts[..., -1], model.eot_id)], -1)
        layout = layout.extend(t, 2)                                               # c_t, <eot>
        h = model.hidden(last.flatten(1), layout, cache).unflatten(1, (M, 2))      # (B, M, 2, H)
    finally:
        drop = cache.get_seq_length() - n
        if drop > 0:
            cache.crop(-drop)       # a negative count removes the newest keys (every 4.x/5.x version)
    return thoughts, h[:, :, 1]


def _stopped(tokenizer, new_ids: list[list[int]], stop: list[str]) -> list[bool]:
    """Whether each row's recent generated text contains a stop string."""
    if not stop:
        return [False] * len(new_ids)
    tail = max(8, max(len(s) for s in stop) + 4)       # tokens; a stop string spans fewer
    return [any(s in tokenizer.decode(ids[-tail:]) for s in stop) for ids in new_ids]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: ThoughtConfig,
             gen: GenerateConfig, tokenizer=None, eos_id: int | None = None, pad_id: int = 0,
             generator: torch.Generator | None = None, return_scores: bool = False) -> Generation:
    """input_ids, attention_mask (B, n), left-padded. Generates up to gen.max_new_tokens per row,
    thinking before each token when gen.thoughts. `tokenizer` is needed for gen.stop."""
    B, n0 = input_ids.shape
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if not bool(attention_mask[:, -1].bool().all()):
        raise ValueError("prompts must be left-padded (every row's last token real)")
    if gen.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    t0 = time.perf_counter()
    dev = input_ids.device
    backend = cfg.attention_backend
    cache = new_cache()
    base_valid = attention_mask.bool()
    h_last = model.hidden(input_ids, Layout.base_only(base_valid, backend), cache)[:, -1]   # (B, H)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    out_tok, out_th, out_mask, out_w, out_scores = [], [], [], [], []
    new_ids: list[list[int]] = [[] for _ in range(B)]
    for step in range(gen.max_new_tokens):
        n = base_valid.shape[1]
        logits = at_least_fp32(model.logits(h_last))                                    # (B, V)
        w = torch.zeros(B, device=dev, dtype=logits.dtype)
        thoughts = torch.zeros(B, cfg.thought_len, dtype=torch.long, device=dev)
        use = torch.zeros(B, dtype=torch.bool, device=dev)
        if gen.thoughts:
            use = ~done
            if gen.think_threshold is not None:
                use = use & (entropy(logits) >= gen.think_threshold)
            if bool(use.any()):
                anchor = torch.full((B, 1), n - 1, dtype=torch.long, device=dev)
                th, h_eot = think(model, cfg, cache, base_valid, anchor, generator)
                mixed, wm = model.mixed_logits(h_last, h_eot[:, 0])
                logits = torch.where(use[:, None], mixed, logits)
                w = torch.where(use, wm.to(w.dtype), w)
                thoughts = th[:, 0]
        logp = torch.log_softmax(logits, dim=-1)
        if gen.temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = sample_tokens(logits, gen.temperature, gen.top_k, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        lengths += (~done).long()
        out_tok.append(nxt)
        out_th.append(thoughts)
        out_mask.append(use)
        out_w.append(w)
        if return_scores:
            out_scores.append(logp)
        for b in range(B):
            if not done[b]:
                new_ids[b].append(int(nxt[b]))
        fin = torch.tensor(_stopped(tokenizer, new_ids, gen.stop), device=dev)
        if eos_id is not None:
            fin = fin | (nxt == eos_id)
        done = done | fin
        if bool(done.all()) or step == gen.max_new_tokens - 1:
            break
        base_valid = torch.cat([base_valid, base_valid.new_ones(B, 1)], dim=1)
        h_last = model.hidden(nxt[:, None], base_step_layout(base_valid, n, backend), cache)[:, 0]
    return Generation(torch.stack(out_tok, 1), lengths, torch.stack(out_th, 1) if gen.thoughts else None,
                      torch.stack(out_mask, 1), torch.stack(out_w, 1),
                      torch.stack(out_scores, 1) if return_scores else None, time.perf_counter() - t0)


def left_pad(tokenizer, texts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize `texts` (no special tokens added) into left-padded (ids, mask)."""
    rows = [tokenizer.encode(s, add_special_tokens=False) for s in texts]
    for s, r in zip(texts, rows):
        if not r:
            raise ValueError(f"prompt {s!r} tokenizes to nothing")
    n = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    x_mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        x_mask[i, n - len(r):] = 1
    return ids.to(device), x_mask.to(device)


def render(tokenizer, g: Generation, row: int, show_thoughts: bool) -> str:
    """The generated text of one row; with show_thoughts each thought is shown before its token."""
    L = int(g.lengths[row])
    ids = g.tokens[row, :L].tolist()
    if not show_thoughts or g.thoughts is None:
        return tokenizer.decode(ids)
    parts = []
    for j, tok in enumerate(ids):
        if bool(g.thought_mask[row, j]):
            parts.append("⟨" + tokenizer.decode(g.thoughts[row, j].tolist()) + f"|w={float(g.mix_w[row, j]):.2f}⟩")
        parts.append(tokenizer.decode([tok]))
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    from .cli import add_dataclass_options, from_options
    from .loading import add_model_args, load_from_args, thought_config

    ap = argparse.ArgumentParser(prog="python -m qstar_ds.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    add_dataclass_options(ap, GenerateConfig, ["max_new_tokens", "temperature", "top_k", "think_threshold", "stop"])
    ap.add_argument("--thoughts", choices=["on", "off"], default="on")
    ap.add_argument("--thought_temperature", type=float, default=1.0)
    ap.add_argument("--show_thoughts", action="store_true", help="print each thought before its token")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        loaded = load_from_args(args)
        cfg = thought_config(loaded, args, temperature=args.thought_temperature)
        gen = from_options(GenerateConfig, args, thoughts=args.thoughts == "on")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"qstar_ds.generate: error: {e}", file=sys.stderr)
        return 2
    model, tok = loaded.model, loaded.tokenizer
    ids, x_mask = left_pad(tok, args.prompt, loaded.device)
    g = torch.Generator(device=loaded.device).manual_seed(args.seed)
    out = generate(model, ids, x_mask, cfg, gen, tokenizer=tok, eos_id=tok.eos_token_id,
                   pad_id=tok.pad_token_id or 0, generator=g)
    for b, p in enumerate(args.prompt):
        print(f"--- prompt {b}: {p!r}")
        print(render(tok, out, b, args.show_thoughts))
    print(f"--- {int(out.lengths.sum())} tokens in {out.seconds:.2f} s = {out.tokens_per_s:.2f} tokens/s; "
          f"thoughts {'on' if gen.thoughts else 'off'} (len {cfg.thought_len}), "
          f"thought before {100 * out.think_rate:.1f}% of tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
