"""Zero-shot evaluation with and without thoughts: GSM8K and CommonsenseQA.

    python -m qstar_ds.evaluate --model smollm2 --tasks csqa,gsm8k --data_dir ../shared/data \\
        --limit 100 --thoughts both
    torchrun --nproc_per_node 2 -m qstar_ds.evaluate ...        # items sharded over the ranks

Per task and thought setting, on the same items (tasks.py for prompts and answer tokens):
- soft: the paper's direct-answer score: product over the gold answer tokens of p(gold token)
  renormalised over the valid answer tokens (digits + newline, or A-E + newline), teacher-forced.
  With thoughts, the distribution before each answer token is the mixed (post-thought) one; only
  thoughts after the positions that predict answer tokens change it, so only those are sampled.
- exact: CSQA: the most likely letter at the answer position; GSM8K: greedy direct answer
  (thinking before every generated token when thoughts are on), first number parsed.
- gsm8k_cot: zero-shot CoT maj@k (Kojima et al.'s protocol as in the paper): "Let's think step by
  step.", k samples at temperature 0.9 up to 384 tokens (stopping early at "\\nQ:"), then
  "Therefore, the answer (arabic numerals) is" and a greedy answer; majority vote over the k
  numbers. Reports maj@k accuracy as exact, the mean single-sample accuracy as soft.
- nll: held-out NLL of any text (`--data nll=FILE`, .jsonl/.json/.parquet/.txt, packed into
  --nll_seq_len-token sequences): per token, the model without thoughts and with one thought after
  each position (heldout.py: the same measurement as the trainer's held-out evaluation), the gain
  with a 95% CI over sequences, the gain by base-NLL decile and over the K-token window.
  --nll_heldout (with --model a training checkpoint or run directory): the run's own held-out
  sequences (its data.* and eval.* settings), text it never trained on.
  The JSON holds each sequence's NLL with and without thoughts (sequence_nll_*, in file order, as
  the trainer's eval/step_*.json), so two checkpoints scored on the same text compare paired.
  --nll_thought_samples K: K thoughts per position, the K mixed predictions averaged (a mixture:
  is the content useful once a single draw's noise is averaged out? K times the compute).
  --nll_read_mix W,...: also the next token under (1 - w) p_base + w p_read for fixed weights w,
  p_read the state after the thought alone: a mixture of the two distributions, in which a wrong
  thought costs at most -log(1 - w) (the mixing head mixes hidden states, i.e. logits).
  --nll_shuffled_thoughts: every position scored again with the thought sampled at the same
  position of another sequence (the previous one): does the model use what it thought, or only
  that it thought? (A pause-token-like effect survives the swap; a content effect does not.)
  --nll_focus REGEX: the same numbers on the tokens whose text overlaps a match of REGEX in the
  decoded sequence and on the rest (heldout.token_focus), e.g. '(?<== )-?\\d+' for the results of
  the built-in corpus's sums: where a thought could compute what one forward pass does not.
Each score comes with n and a 95% confidence interval (Wilson for accuracies, normal for soft).
Results: a printed table and a JSON file with every item's prediction.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import distributed
from .config import ConfigError, ThoughtConfig
from .generate import GenerateConfig, entropy, generate, left_pad, think
from .heldout import (content_effect, focus_line, focus_positions, focus_summary, line as heldout_line,
                      mean_ci as heldout_mean_ci, mixture, read_mix, sequence_nll, summarize, token_focus,
                      token_scores)
from .layout import Layout
from .logprobs import at_least_fp32
from .model import shape_of
from .rollout import default_positions, new_cache, oracle_thoughts, rollout
from .teacher import sampled_where_asked
from .schedule import rank_major_order
from .tasks import (COT_ANSWER, COT_TRIGGER, TASKS, AnswerTokens, Item, TaskError, answer_tokens, first_number,
                    load_items, majority)


DRAW_SEED_STRIDE = 1_000_003
"""nll with k thoughts per position: draw j samples with seed + j * this."""


@dataclass
class EvalSettings:
    """What evaluate runs (thought settings are a ThoughtConfig)."""

    batch_size: int = 8
    """Items per forward pass (CoT: items per batch, each with cot_samples rows)."""
    max_answer_tokens: int = 12
    """GSM8K direct answer: greedy tokens generated before parsing (stops at a newline)."""
    cot_samples: int = 8
    """k of maj@k."""
    cot_max_tokens: int = 384
    """Reasoning tokens per CoT sample."""
    cot_temperature: float = 0.9
    """Sampling temperature of the CoT reasoning."""
    seed: int = 0
    """Seeds thought sampling (per batch: seed + index of the batch's first item)."""
    think_threshold: float | None = None
    """Think only where the base next-token entropy (nats) is >= this (generate.py); None = always."""


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def mean_ci(xs: list[float], z: float = 1.96) -> tuple[float, float]:
    n = len(xs)
    if n < 2:
        return (xs[0], xs[0]) if xs else (0.0, 0.0)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return (max(0.0, m - z * sd / math.sqrt(n)), min(1.0, m + z * sd / math.sqrt(n)))  # scores lie in [0, 1]


# ---- scoring ---------------------------------------------------------------------------------
@torch.no_grad()
def answer_logprobs(model, cfg: ThoughtConfig, tokenizer, items: list[Item], thoughts: bool,
                    generator: torch.Generator | None, device, think_threshold: float | None = None
                    ) -> list[tuple[torch.Tensor, list[int], torch.Tensor | None, torch.Tensor]]:
    """For each item: (log-probs (A, V) before each of its A answer tokens, the answer token ids,
    the thoughts (A, t) sampled there or None, (A,) bool whether the thought was used),
    teacher-forced on prompt + gold answer; mixed (post-thought) log-probs when `thoughts`, only
    where the base entropy is >= think_threshold if one is given."""
    rows, spans = [], []
    for it in items:
        p = tokenizer.encode(it.prompt, add_special_tokens=False)
        a = tokenizer.encode(it.answer, add_special_tokens=False)
        rows.append(p + a)
        spans.append((len(p), a))
    n = max(len(r) for r in rows)
    B = len(rows)
    pad = tokenizer.pad_token_id or 0
    ids = torch.full((B, n), pad, dtype=torch.long)
    x_mask = torch.zeros(B, n, dtype=torch.long)
    A = max(len(a) for _, a in spans)
    anchor = torch.zeros(B, A, dtype=torch.long)
    for b, (r, (lp, a)) in enumerate(zip(rows, spans)):
        off = n - len(r)
        ids[b, off:], x_mask[b, off:] = torch.tensor(r), 1
        pos = [off + lp - 1 + j for j in range(len(a))]          # the token before each answer token
        anchor[b] = torch.tensor(pos + [pos[-1]] * (A - len(a)))
    ids, x_mask, anchor = ids.to(device), x_mask.to(device), anchor.to(device)
    cache = new_cache() if thoughts else None
    base_valid = x_mask.bool()
    h = model.hidden(ids, Layout.base_only(base_valid, cfg.attention_backend), cache)   # (B, n, H)
    h_base = h.gather(1, anchor[..., None].expand(-1, -1, h.shape[-1]))                 # (B, A, H)
    thought_ids = None
    z = at_least_fp32(model.logits(h_base))                                                  # (B, A, V)
    used = torch.zeros(z.shape[:2], dtype=torch.bool, device=z.device)
    if thoughts:
        used = ~used if think_threshold is None else entropy(z) >= think_threshold
        if bool(used.any()):
            thought_ids, h_eot = think(model, cfg, cache, base_valid, anchor, generator)         # (B, A, H)
            mixed, _ = model.mixed_logits(h_base, h_eot)
            z = torch.where(used[..., None], mixed, z)
    logp = torch.log_softmax(z, dim=-1)
    return [(logp[b, :len(a)], a, None if thought_ids is None else thought_ids[b, :len(a)], used[b, :len(a)])
            for b, (_, a) in enumerate(spans)]


def soft_score(logp: torch.Tensor, answer: list[int], valid: list[int]) -> float:
    """prod over scored answer tokens of p(gold) / sum_{v in valid} p(v); answer tokens outside
    the valid set (a leading space token, a minus sign) are context, not scored."""
    vs = set(valid)
    idx = torch.tensor(valid, device=logp.device)
    total = 0.0
    for j, tok in enumerate(answer):
        if tok in vs:
            total += float(logp[j, tok] - torch.logsumexp(logp[j, idx], dim=0))
    return math.exp(total)


def first_scored(answer: list[int], choices: dict[int, str]) -> int:
    for j, tok in enumerate(answer):
        if tok in choices:
            return j
    raise TaskError(f"the gold answer tokens {answer} contain no answer letter token")


def eval_batch(model, cfg: ThoughtConfig, tokenizer, task: str, items: list[Item], toks: AnswerTokens,
               thoughts: bool, settings: EvalSettings, device) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(settings.seed + items[0].index)
    out = []
    if task == "gsm8k_cot":
        return cot_batch(model, cfg, tokenizer, items, thoughts, settings, g, device)
    scored = answer_logprobs(model, cfg, tokenizer, items, thoughts, g, device, settings.think_threshold)
    if task == "csqa":
        letters = torch.tensor(list(toks.choices), device=device)
        for it, (logp, a, _, used) in zip(items, scored):
            j = first_scored(a, toks.choices)
            pred = toks.choices[int(letters[logp[j, letters].argmax()])]
            out.append({"index": it.index, "id": it.id, "gold": it.gold, "pred": pred, "correct": pred == it.gold,
                        "soft": soft_score(logp, a, toks.valid), "thought": [int(used.sum()), len(a)]})
        return out
    # gsm8k: soft from the teacher-forced pass, exact from a greedy direct answer
    ids, x_mask = left_pad(tokenizer, [it.prompt for it in items], device)
    gen = generate(model, ids, x_mask, cfg, GenerateConfig(settings.max_answer_tokens, 0.0, thoughts=thoughts,
                                                       think_threshold=settings.think_threshold, stop=["\n"]),
                   tokenizer=tokenizer, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id or 0,
                   generator=g)
    for b, (it, (logp, a, _, used)) in enumerate(zip(items, scored)):
        L = int(gen.lengths[b])
        text = tokenizer.decode(gen.tokens[b, :L].tolist())
        pred = first_number(text.split("\n")[0] if text.strip() else text)
        out.append({"index": it.index, "id": it.id, "gold": it.gold, "pred": pred, "output": text,
                    "correct": pred == it.gold, "soft": soft_score(logp, a, toks.valid),
                    "thought": [int(used.sum()) + int(gen.thought_mask[b, :L].sum()), len(a) + L]})
    return out


def cot_batch(model, cfg, tokenizer, items: list[Item], thoughts: bool, settings: EvalSettings, g, device) -> list[dict]:
    k = settings.cot_samples
    prompts = [it.prompt + COT_TRIGGER for it in items for _ in range(k)]
    ids, x_mask = left_pad(tokenizer, prompts, device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or 0
    sampling = GenerateConfig(settings.cot_max_tokens, settings.cot_temperature, thoughts=thoughts,
                              think_threshold=settings.think_threshold, stop=["\nQ:"])
    reason = generate(model, ids, x_mask, cfg, sampling, tokenizer=tokenizer, eos_id=eos, pad_id=pad, generator=g)
    texts = []
    for b in range(len(prompts)):
        t = tokenizer.decode(reason.tokens[b, :int(reason.lengths[b])].tolist(), skip_special_tokens=True)
        texts.append(t.split("\nQ:")[0].rstrip())
    ids, x_mask = left_pad(tokenizer, [p + t + COT_ANSWER for p, t in zip(prompts, texts)], device)
    ans = generate(model, ids, x_mask, cfg, GenerateConfig(settings.max_answer_tokens, 0.0, thoughts=thoughts,
                                                       think_threshold=settings.think_threshold, stop=["\n"]),
                   tokenizer=tokenizer, eos_id=eos, pad_id=pad, generator=g)
    out = []
    for i, it in enumerate(items):
        preds = []
        for b in range(i * k, (i + 1) * k):
            preds.append(first_number(tokenizer.decode(ans.tokens[b, :int(ans.lengths[b])].tolist())))
        pred = majority(preds)
        single = sum(p == it.gold for p in preds) / k
        rows = range(i * k, (i + 1) * k)
        n_th = sum(int(g_.thought_mask[b, :int(g_.lengths[b])].sum()) for g_ in (reason, ans) for b in rows)
        n_tok = sum(int(g_.lengths[b]) for g_ in (reason, ans) for b in rows)
        out.append({"index": it.index, "id": it.id, "gold": it.gold, "pred": pred, "samples": preds,
                    "reasoning": texts[i * k], "correct": pred == it.gold, "soft": single, "thought": [n_th, n_tok]})
    return out


@torch.no_grad()
def nll_scores(model, cfg: ThoughtConfig, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, seed: int,
               filler_id: int | None = None, progress: bool = False,
               thoughts: torch.Tensor | None = None, index: torch.Tensor | None = None,
               read: bool = False, partial: bool = False) -> dict[str, torch.Tensor]:
    """heldout.token_scores of sequences (D, n), one thought per position (the filler thought
    for a model trained with filler thoughts; `thoughts` (D, P, t): these, with `partial` sampled
    where they are below 0) -> tensors (D, P)
    (with "anchor", the position i each scores x_{i+1} after), and "thoughts" (D, P, t), the
    thoughts scored. Each batch samples with seed + the index (in
    `index` (D,), default 0..D-1) of its first sequence: with batch size 1 every sequence draws
    the same thoughts however the file is split over ranks. `read`: also "read", the post-thought
    state's own log-prob of the next token."""
    from tqdm import tqdm
    dev = model.lm_head.weight.device
    positions = default_positions(ids.shape[1], cfg.talk_len, dev)
    parts: dict[str, list] = {}
    for a in tqdm(range(0, ids.shape[0], batch_size), desc="nll", unit="batch", file=sys.stderr,
                  disable=not progress, dynamic_ncols=True):
        x, x_mask = ids[a:a + batch_size].to(dev), mask[a:a + batch_size].to(dev)
        fixed = None if filler_id is None else x.new_full((x.shape[0], positions.numel(), cfg.thought_len), filler_id)
        if thoughts is not None:
            fixed = thoughts[a:a + batch_size].to(dev)
        first = a if index is None else int(index[a])
        ro = rollout(model, cfg, x, x_mask, positions, torch.Generator(device=dev).manual_seed(seed + first),
                     base_logprobs=True, thoughts=fixed, read_logprobs_too=read, partial=partial)
        for k, v in token_scores(ro.base_logp, ro.talk_logp, ro.anchor, ro.valid, ro.mix_w,
                                 read_logp=ro.read_logp).items():
            parts.setdefault(k, []).append(v.cpu())
        parts.setdefault("anchor", []).append(ro.anchor.cpu())
        parts.setdefault("thoughts", []).append(ro.thoughts.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def nll_sequences(tokenizer, path: str, seq_len: int, count: int, text_field: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `count` packed sequences of `seq_len` tokens from a text file (fewer if it runs out)."""
    from .data import DataError, SequenceStream, first_sequences
    try:
        return first_sequences(SequenceStream(tokenizer, path, seq_len, pack=True, text_field=text_field), count)
    except DataError as e:
        raise TaskError(f"task nll: {e}") from None


def run_heldout_sequences(run_config: dict, tokenizer, count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out sequences of the training run whose config is `run_config` (checkpoint meta):
    its data.* and eval.* settings, the first `count` (default: as many as the run scored)."""
    from .cli import _build
    from .config import DataConfig, EvalConfig
    from .data import DataError, heldout_sequences
    try:
        d = _build(DataConfig, {**asdict(DataConfig()), **run_config.get("data", {})}, "data.")
        e = _build(EvalConfig, {**asdict(EvalConfig()), **run_config.get("eval", {})}, "eval.")
        return heldout_sequences(tokenizer, d, e, count)
    except (DataError, KeyError) as err:
        raise TaskError(f"task nll --nll_heldout: the run's held-out text: {err}") from None


def run_nll(model, tokenizer, cfg: ThoughtConfig, path: str, args, filler_id: int | None, rank: int, world: int,
            sequences: tuple[torch.Tensor, torch.Tensor] | None = None, oracle: tuple[int, str] | None = None,
            teacher: int | None = None) -> dict:
    """`sequences` (ids, mask): score these (described by `path`), else the file at `path`.
    `oracle` (filler token, pattern) of a model trained with thought.mode=oracle: its thoughts,
    the text's own continuation where the pattern marks the next token (rollout.oracle_thoughts).
    `teacher` (filler token) of a model trained with thought.mode=teacher: its own thought where
    the context asks for a sum, the filler elsewhere (teacher.sampled_where_asked)."""
    ids, mask = sequences or nll_sequences(tokenizer, path, args.nll_seq_len, args.nll_sequences or 64,
                                           args.text_field)
    ecfg = ThoughtConfig(**{**vars(cfg), "n_thoughts": 1, "talk_len": args.talk_len})
    shuffled = getattr(args, "nll_shuffled_thoughts", False)
    mine_ids, mine_mask = ids[rank::world], mask[rank::world]
    if shuffled and filler_id is not None:
        raise TaskError("--nll_shuffled_thoughts: this model was trained with filler thoughts, which have no "
                        "content to shuffle")
    if shuffled and ids.shape[0] < 2:
        raise TaskError(f"--nll_shuffled_thoughts needs >= 2 sequences; {path} gives {ids.shape[0]}")
    # filler thoughts are fixed: more draws would be the same draw again
    draws = 1 if filler_id is not None or oracle is not None else getattr(args, "nll_thought_samples", 1)
    fixed = None
    if oracle is not None:
        fill, pattern = oracle
        anchor = default_positions(ids.shape[1], ecfg.talk_len)[None].expand(mine_ids.shape[0], -1)
        marked = token_focus(mine_ids, tokenizer, pattern) & mine_mask.bool() if pattern else None
        fixed = oracle_thoughts(mine_ids, mine_mask, anchor, marked, ecfg.thought_len, fill)
    if teacher is not None:
        anchor = default_positions(ids.shape[1], ecfg.talk_len)[None].expand(mine_ids.shape[0], -1)
        fixed = sampled_where_asked(mine_ids, mine_mask, anchor, tokenizer, ecfg.thought_len, teacher)
    mix_ws = getattr(args, "nll_read_mix", None) or []
    t0 = time.perf_counter()
    mine_index = torch.arange(ids.shape[0])[rank::world]
    mine_draws, other_draws = [], []
    for j in range(draws):
        one = nll_scores(model, ecfg, mine_ids, mine_mask, args.batch_size, args.seed + j * DRAW_SEED_STRIDE,
                         filler_id, progress=rank == 0, index=mine_index, read=bool(mix_ws), thoughts=fixed,
                         partial=teacher is not None)
        mine_draws.append(one)
        if shuffled:
            # sequence d gets the thoughts sampled at the same positions of sequence d - 1 (mod D)
            th = one["thoughts"]                                                # (D / world, P, t)
            every = th
            if world > 1:
                every = th.new_empty((ids.shape[0],) + th.shape[1:])           # (D, P, t)
                for r, part in enumerate(distributed.gather_objects(th)):
                    every[r::world] = part
            other_draws.append(nll_scores(model, ecfg, mine_ids, mine_mask, args.batch_size, args.seed,
                                          progress=rank == 0, thoughts=every.roll(1, dims=0)[rank::world],
                                          index=mine_index, read=bool(mix_ws)))
    mine, other = mixture(mine_draws), mixture(other_draws) if other_draws else None
    if world > 1:   # rank q scored sequences q, q + world, ...: back to 0..D-1
        parts = distributed.gather_objects((mine, other))
        order = torch.tensor(rank_major_order(ids.shape[0], world)[1])
        mine, other = ({k: torch.cat([p[i][k] for p in parts])[order] for k in parts[0][i]} if parts[0][i] else None
                       for i in (0, 1))
    m = summarize(mine, ecfg.talk_len)
    if other is not None:
        m["shuffled"] = content_effect(mine, other)
    # per sequence, in file order: the values the trainer's eval/step_*.json holds, for paired comparisons
    m.update({f"sequence_nll_{name}{tail}": sequence_nll(mine, th, skip_first=skip).tolist()
              for name, th in (("base", False), ("thoughts", True)) for tail, skip in (("", False), ("_rest", True))})
    if mix_ws:
        m["read_mix"] = read_mix_summary(mine, other, mix_ws)
    pattern = getattr(args, "nll_focus", None)
    if pattern:
        where = focus_positions(token_focus(ids, tokenizer, pattern), mine["anchor"], mine["valid"])
        m["focus"] = {"pattern": pattern, **focus_summary(mine, where, other)}
    m.update(task="nll", file=path, seq_len=args.nll_seq_len, talk_len=ecfg.talk_len, temperature=ecfg.temperature,
             thoughts="filler" if filler_id is not None else "oracle" if oracle is not None else
             "sampled where the context asks for a sum" if teacher is not None else "sampled",
             thought_samples=draws,
             seconds=time.perf_counter() - t0)
    return m


def read_mix_summary(mine: dict, other: dict | None, weights: list[float]) -> dict:
    """For each w: the NLL of the next token under (1 - w) p_base + w p_read (heldout.read_mix),
    per sequence in file order (and without each sequence's first scored position), its mean
    over the sequences that have scored positions, and with `other` (another sequence's
    thoughts) the paired content effect (its NLL minus the own thoughts'), 95% CI."""
    valid = mine["valid"].bool()
    keep = valid.any(1)
    out = {"nll_read": float(sequence_nll(mine, True, logp=mine["read"])[keep].mean())}
    for w in weights:
        own = sequence_nll(mine, True, logp=read_mix(mine, w))
        row = {"nll": float(own[keep].mean()), "sequence_nll": own.tolist(),
               "sequence_nll_rest": sequence_nll(mine, True, skip_first=True, logp=read_mix(mine, w)).tolist()}
        if other is not None:
            theirs = sequence_nll(other, True, logp=read_mix(other, w))
            m, lo, hi = heldout_mean_ci((theirs - own)[keep])
            row.update(nll_other=float(theirs[keep].mean()), content=m, content_ci95=[lo, hi],
                       sequence_nll_other=theirs.tolist())
        out[f"{w:g}"] = row
    return out


def read_mix_lines(r: dict) -> list[str]:
    lines = [f"the post-thought state alone (read): NLL {r['nll_read']:.4f}"]
    for w, row in r.items():
        if w == "nll_read":
            continue
        txt = f"(1 - w) p_base + w p_read, w = {w}: NLL {row['nll']:.4f}"
        if "content" in row:
            lo, hi = row["content_ci95"]
            txt += (f"; with another sequence's thoughts {row['nll_other']:.4f}, content {row['content']:+.4f} "
                    f"(95% CI {lo:+.4f}..{hi:+.4f})")
        lines.append(txt)
    return lines


def content_line(c: dict) -> str:
    lo, hi = c["content_gain_ci95"]
    rlo, rhi = c["content_gain_rest_ci95"]
    return (f"its own thoughts against another sequence's at the same positions: {c['content_gain']:+.4f} "
            f"nats/token (95% CI {lo:+.4f}..{hi:+.4f}; without each sequence's first position "
            f"{c['content_gain_rest']:+.4f}, {rlo:+.4f}..{rhi:+.4f}); NLL with another sequence's thoughts "
            f"{c['nll_mixed_other']:.4f}")


# ---- running ---------------------------------------------------------------------------------
def gather(rows: list[dict], world: int) -> list[dict]:
    return [r for p in distributed.gather_objects(rows) for r in p] if world > 1 else rows


def summarise(task: str, thoughts: bool, rows: list[dict], seconds: float, think_len: int) -> dict:
    n = len(rows)
    soft = [r["soft"] for r in rows]
    k = sum(bool(r["correct"]) for r in rows)
    thought_counts = [sum(r["thought"][i] for r in rows) for i in (0, 1)]
    return {"task": task, "thoughts": thoughts, "thought_len": think_len if thoughts else 0, "n": n,
            "soft": sum(soft) / n, "soft_ci95": mean_ci(soft), "exact": k / n, "exact_ci95": wilson(k, n),
            "think_rate": thought_counts[0] / max(thought_counts[1], 1), "seconds": seconds}


def run(model, tokenizer, cfg: ThoughtConfig, tasks: list[str], with_thoughts: list[bool], settings: EvalSettings,
        items_by_task: dict[str, list[Item]], device, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Evaluate every (task, thoughts) pair on the same items; rows sharded item-wise over ranks."""
    from tqdm import tqdm
    results, per_item = [], {}
    vocab = shape_of(model.lm_head.weight)[0]          # the full size, also when ZeRO-3 partitioned it
    for task in tasks:
        toks = answer_tokens(tokenizer, task, vocab)
        mine = items_by_task[task][rank::world]
        for thoughts in with_thoughts:
            t0 = time.perf_counter()
            rows = []
            batches = [mine[i:i + settings.batch_size] for i in range(0, len(mine), settings.batch_size)]
            it = tqdm(batches, desc=f"{task} thoughts={'on' if thoughts else 'off'}", unit="batch", file=sys.stderr,
                      disable=not progress or rank != 0, dynamic_ncols=True)
            for batch in it:
                rows += eval_batch(model, cfg, tokenizer, task, batch, toks, thoughts, settings, device)
            rows = sorted(gather(rows, world), key=lambda r: r["index"])
            results.append(summarise(task, thoughts, rows, time.perf_counter() - t0, cfg.thought_len))
            per_item[f"{task}/thoughts_{'on' if thoughts else 'off'}"] = rows
    return {"results": results, "items": per_item}


def table(results: list[dict]) -> str:
    head = (f"{'task':<10} {'thoughts':<9} {'n':>5}  {'soft':>7} {'95% CI':>17}  {'exact':>7} {'95% CI':>17}  "
            f"{'thinks':>6}  {'s':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        shown = f"on/{r['thought_len']}" if r["thoughts"] else "off"
        lines.append(f"{r['task']:<10} {shown:<9} {r['n']:>5}  {100 * r['soft']:6.2f}% "
                     f"[{100 * r['soft_ci95'][0]:5.1f}, {100 * r['soft_ci95'][1]:5.1f}]  {100 * r['exact']:6.2f}% "
                     f"[{100 * r['exact_ci95'][0]:5.1f}, {100 * r['exact_ci95'][1]:5.1f}]  "
                     f"{100 * r['think_rate']:5.1f}%  {r['seconds']:7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .cli import add_dataclass_options, from_options
    from .loading import add_model_args, check_model_arg, is_checkpoint, load_from_args, thought_config

    ap = argparse.ArgumentParser(prog="python -m qstar_ds.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--tasks", default="gsm8k,csqa", help=f"comma-separated among {', '.join(TASKS + ('nll',))}")
    ap.add_argument("--data_dir", default=None, help="directory with gsm8k/test.jsonl and commonsenseqa/dev.jsonl "
                                                     "(default: the hub)")
    ap.add_argument("--data", action="append", default=[], metavar="TASK=FILE", help="a jsonl file for one task")
    ap.add_argument("--limit", type=int, default=None, help="first N items of each task")
    ap.add_argument("--thoughts", choices=["on", "off", "both"], default="both")
    ap.add_argument("--thought_temperature", type=float, default=0.001, help="paper's evaluation value")
    add_dataclass_options(ap, EvalSettings)
    ap.add_argument("--nll_seq_len", type=int, default=128, help="nll: tokens per packed sequence")
    ap.add_argument("--nll_sequences", type=int, default=None,
                    help="nll: sequences scored (fewer if the text ends; default 64, or with --nll_heldout "
                         "the run's eval.sequences)")
    ap.add_argument("--nll_heldout", action="store_true",
                    help="nll: score the held-out text of the training run --model comes from (a checkpoint "
                         "or run directory): the sequences its own evaluation scored, never trained on")
    add_dataclass_options(ap, ThoughtConfig, ["talk_len"])
    ap.add_argument("--text_field", default="text", help="nll: the text column of a jsonl/json/parquet file")
    ap.add_argument("--nll_shuffled_thoughts", action="store_true",
                    help="nll: also score every position with the thought sampled at the same position of "
                         "another sequence: how much of the gain is the thought's content")
    ap.add_argument("--nll_thought_samples", type=int, default=1, metavar="K",
                    help="nll: sample K thoughts per position (draw j with seed + j * 1000003) and score the "
                         "average of the K mixed predictions (K times the compute; filler thoughts: one draw)")
    ap.add_argument("--nll_read_mix", default=None, metavar="W[,W...]",
                    help="nll: also score the next token under (1 - w) p_base + w p_read for each fixed w in "
                         "(0, 1], p_read the state after the thought alone (a probability mixture, no mixing head)")
    ap.add_argument("--nll_focus", default=None, metavar="REGEX",
                    help="nll: also report the numbers on the tokens whose text overlaps a match of this regular "
                         "expression (and on the rest), e.g. '(?<== )-?\\d+' for results after '= '")
    ap.add_argument("--output", default="eval_results.json")
    args = ap.parse_args(argv)
    rank, world = distributed.join_launcher_group()
    device = args.device
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        known = TASKS + ("nll",)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        for t in tasks:
            if t not in known:
                raise TaskError(f"--tasks: unknown task {t!r}; known: {', '.join(known)}")
        files = {}
        for d in args.data:
            task, sep, path = d.partition("=")
            if not sep or task not in known:
                raise TaskError(f"--data={d!r}: expected TASK=FILE with TASK among {', '.join(known)}")
            files[task] = path
        for name, v in [("limit", args.limit), ("batch_size", args.batch_size), ("cot_samples", args.cot_samples),
                        ("cot_max_tokens", args.cot_max_tokens), ("max_answer_tokens", args.max_answer_tokens),
                        ("nll_sequences", args.nll_sequences), ("talk_len", args.talk_len),
                        ("nll_thought_samples", args.nll_thought_samples)]:
            if v is not None and v < 1:
                raise TaskError(f"--{name}={v}: must be >= 1")
        if args.nll_read_mix is not None:
            try:
                args.nll_read_mix = [float(w) for w in args.nll_read_mix.split(",") if w.strip()]
            except ValueError:
                raise TaskError(f"--nll_read_mix={args.nll_read_mix!r}: expected comma-separated numbers") from None
            for w in args.nll_read_mix:
                if not 0 < w <= 1:
                    raise TaskError(f"--nll_read_mix: w = {w:g} must be in (0, 1]")
        if args.nll_focus is not None:
            try:
                if re.compile(args.nll_focus).pattern == "":
                    raise re.error("empty")
            except re.error as e:
                raise TaskError(f"--nll_focus={args.nll_focus!r}: not a usable regular expression ({e})") from None
        if args.nll_seq_len < args.talk_len + 1:
            raise TaskError(f"--nll_seq_len={args.nll_seq_len}: must be >= talk_len + 1 = {args.talk_len + 1}")
        nll_file = None
        if "nll" in tasks:
            nll_file = files.get("nll")
            if args.nll_heldout:
                if nll_file is not None:
                    raise TaskError("task nll: give either --data nll=FILE or --nll_heldout, not both")
                if not (os.path.isdir(args.model) and is_checkpoint(args.model)):
                    raise TaskError(f"--nll_heldout: --model={args.model!r} is not a training checkpoint or run "
                                    f"directory, so there is no run whose held-out text to score")
                nll_file = f"the held-out text of {args.model}"
            elif nll_file is None:
                raise TaskError("task nll needs its text: --data nll=FILE (.jsonl/.json/.parquet/.txt) or "
                                "--nll_heldout")
            elif not os.path.isfile(nll_file):
                raise TaskError(f"task nll: data file {nll_file} not found")
            tasks.remove("nll")
        check_model_arg(args)
        # gsm8k_cot reads the gsm8k file unless given its own
        items = {t: load_items(t, files.get(t) or files.get(t.removesuffix("_cot")), args.data_dir, args.limit)
                 for t in tasks}
        loaded = load_from_args(args, device)
        cfg = thought_config(loaded, args, temperature=args.thought_temperature)
        if loaded.oracle is not None and tasks and args.thoughts != "off":
            raise TaskError(f"--model={args.model!r} was trained with oracle thoughts (thought.mode=oracle), the "
                            f"text's own continuation, which a question has not got: score it with --tasks nll, or "
                            f"{','.join(tasks)} with --thoughts off")
        if loaded.teacher is not None and tasks and args.thoughts != "off":
            raise TaskError(f"--model={args.model!r} was trained with teacher thoughts (thought.mode=teacher): it "
                            f"thinks only where the context asks for a sum, which the task scorers do not follow: score "
                            f"it with --tasks nll, or {','.join(tasks)} with --thoughts off")
        if not args.cot_temperature > 0:
            raise TaskError(f"--cot_temperature={args.cot_temperature}: must be > 0")
    except (ConfigError, TaskError, ValueError, FileNotFoundError) as e:
        print(f"qstar_ds.evaluate: error: {e}", file=sys.stderr)
        return 2
    settings = from_options(EvalSettings, args)
    with_thoughts = {"on": [True], "off": [False], "both": [False, True]}[args.thoughts]
    out = run(loaded.model, loaded.tokenizer, cfg, tasks, with_thoughts, settings, items, loaded.device, rank, world)
    nll = None
    if nll_file is not None:
        try:
            seqs = None
            if args.nll_heldout:
                seqs = run_heldout_sequences(loaded.run_config, loaded.tokenizer, args.nll_sequences)
                args.nll_seq_len = int(seqs[0].shape[1])
            nll = run_nll(loaded.model, loaded.tokenizer, cfg, nll_file, args, loaded.filler_id, rank, world, seqs,
                          oracle=loaded.oracle, teacher=loaded.teacher)
        except (ConfigError, TaskError) as e:
            print(f"qstar_ds.evaluate: error: {e}", file=sys.stderr)
            return 2
    if rank == 0:
        out = {"model": loaded.source, "world_size": world, "thought_config": vars(cfg), "settings": vars(settings),
               **out, **({"nll": nll} if nll is not None else {})}
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1, default=str)
        os.replace(tmp, args.output)
        print(f"model: {loaded.source}")
        if out["results"]:
            print(table(out["results"]))
        if nll is not None:
            if args.thoughts == "off":
                print(f"nll {nll_file}: {nll['nll_base']:.4f} nats/token without thoughts over {nll['sequences']} "
                      f"sequences ({nll['tokens']} tokens)")
            else:
                k = nll["thought_samples"]
                print(heldout_line(f"nll {nll_file}" + (f" ({k} thoughts per position, mixed predictions averaged)"
                                                        if k > 1 else "") + ":", nll))
                if "shuffled" in nll:
                    print(content_line(nll["shuffled"]))
                if "read_mix" in nll:
                    print("\n".join(read_mix_lines(nll["read_mix"])))
                if "focus" in nll:
                    print(focus_line(nll["focus"]["pattern"], nll["focus"]))
        print(f"results: {args.output}")
    distributed.close(wait=False)
    return 0


if __name__ == "__main__":
    from qstar_ds.process_exit import exit_process
    exit_process(main())
