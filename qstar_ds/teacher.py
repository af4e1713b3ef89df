"""thought.mode=teacher: a written step as the thought where the context asks for a sum.

A diagnostic of the policy, never the method: would thoughts help this model if its policy wrote
a step that computes? Where the text before and at x_i ends with a sum of two whole numbers and
its result so far ("a + b =", then optionally " " and the digits written so far: decidable from
the context alone, no future), the thought after x_i is the units step "u+v=s" (u, v the units
digits of a and b, s their sum: the result's last digit and the carry), padded with the filler
token; elsewhere the filler thought. In training the step is fed as the thought (the reader and mixing head learn to
read it) and its tokens are the policy's targets (reward 1: the REINFORCE term becomes the step's
NLL after <|startofthought|>); in evaluation the model samples its own thought where the context
asks for a sum, so what is measured is what its own steps are worth.
"""
from __future__ import annotations

import re

import torch

from .heldout import token_texts

SUM = re.compile(r"(?<![\d.])(\d+) \+ (\d+) =( \d*)?")
"""A sum of two whole numbers and the digits of its result written so far."""
SUM_RESULTS = r"(?<=\d \+ \d = )\d+|(?<=\d \+ \d\d = )\d+|(?<=\d \+ \d\d\d = )\d+"
"""A --focus pattern (heldout.token_focus) for the results of such sums (second term < 1000)."""
LONGEST_STEP = "9+9=18"


def units_step(a: int, b: int) -> str:
    """The thought before (every digit of) the result of a + b: '8+6=14' for 18 + 16."""
    u, v = a % 10, b % 10
    return f"{u}+{v}={u + v}"


def step_ids(tokenizer, text: str, t: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) > t:
        raise ValueError(f"thought.thought_len={t}: thought.mode=teacher writes steps such as {text!r}, "
                         f"{len(ids)} tokens with this tokenizer")
    return ids


def context_steps(row: list[int], valid: list[bool], tokenizer) -> list[str | None]:
    """Per token j of one sequence: the units step when the text up to and including token j ends
    with "a + b =", optionally " " and digits of the result, else None (also on padding)."""
    pieces = token_texts(row, tokenizer)
    text = "".join(pieces)
    # from just after "=" (a tokenizer may join the space to the first digit) to the result's end
    spans = [(m.end(2) + 2, m.end(), units_step(int(m.group(1)), int(m.group(2)))) for m in SUM.finditer(text)]
    out, end = [], 0
    for j, piece in enumerate(pieces):
        end += len(piece)
        step = next((s for a, b, s in spans if a <= end <= b), None) if valid[j] else None
        out.append(step)
    return out


def teacher_thoughts(ids: torch.Tensor, mask: torch.Tensor, anchor: torch.Tensor, tokenizer, t: int,
                     filler_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n) ids and mask, (B, M) anchors -> thoughts (B, M, t) (the step after an anchor whose
    context asks for a sum, padded with `filler_id`; the filler thought elsewhere) and (B, M) bool:
    which anchors got a step."""
    B, M = anchor.shape
    thoughts = torch.full((B, M, t), filler_id, dtype=torch.long)
    on = torch.zeros(B, M, dtype=torch.bool)
    cache: dict[str, list[int]] = {}
    for b in range(B):
        steps = context_steps(ids[b].tolist(), mask[b].bool().tolist(), tokenizer)
        for m, i in enumerate(anchor[b].tolist()):
            if steps[i] is not None:
                s = cache.setdefault(steps[i], step_ids(tokenizer, steps[i], t))
                thoughts[b, m, :len(s)] = torch.tensor(s)
                on[b, m] = True
    return thoughts.to(ids.device), on.to(ids.device)


def sampled_where_asked(ids: torch.Tensor, mask: torch.Tensor, anchor: torch.Tensor, tokenizer, t: int,
                        filler_id: int) -> torch.Tensor:
    """Evaluation: (B, M, t) partial thoughts for rollout(partial=True): -1 (the model samples its
    own thought) where the context asks for a sum, the filler thought elsewhere."""
    thoughts, on = teacher_thoughts(ids, mask, anchor, tokenizer, t, filler_id)
    return torch.where(on[..., None], torch.full_like(thoughts, -1), thoughts)


def check_fits(tokenizer, t: int) -> None:
    """Raise ValueError naming thought.thought_len when the longest step does not fit."""
    step_ids(tokenizer, LONGEST_STEP, t)


def writes_step(thoughts: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, anchor: torch.Tensor,
                where: torch.Tensor, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, P, t) own thoughts -> (wrote, has), (D, P) bool each: `has`, the position (where `where`)
    has a teacher step; `wrote`, the thought's text, spaces removed, starts with it."""
    wrote, has = torch.zeros_like(where), torch.zeros_like(where)
    for d in range(ids.shape[0]):
        if not where[d].any():
            continue
        steps = context_steps(ids[d].tolist(), mask[d].bool().tolist(), tok)
        for p in where[d].nonzero()[:, 0].tolist():
            step = steps[int(anchor[d, p])]
            if step is not None:
                has[d, p] = True
                wrote[d, p] = tok.decode(thoughts[d, p].tolist()).replace(" ", "").startswith(step)
    return wrote, has
