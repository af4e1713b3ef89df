"""Which work goes to which rank: pure code, no process group. One optimizer step's thought
streams cut into learn chunks and dealt to the ranks, the rollout cut into units, held-out
sequences sharded for evaluation. Every rank runs the same number of micro-steps and forwards
(ZeRO-3 gathers parameters collectively): a rank short of work repeats a unit whose result is
dropped (weight 0). distributed.py runs what this file decides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Config


@dataclass
class StepPlan:
    """How one optimizer step is cut into micro-steps."""
    n_streams: int          # M: streams per sequence (positions * r)
    streams_per_chunk: int
    chunks_per_seq: int
    total_chunks: int       # over the global batch
    world: int

    @property
    def grad_accum(self) -> int:
        return math.ceil(self.total_chunks / self.world)

    @property
    def wasted(self) -> float:
        """Share of the step's micro-steps that are weight-0 repeats (ranks without a chunk)."""
        return 1 - self.total_chunks / (self.grad_accum * self.world)

    def chunks(self) -> list[tuple[int, int, int]]:
        """(sequence, first stream, end stream) of every chunk of the global batch."""
        out = []
        for s in range(self.total_chunks // self.chunks_per_seq):
            for c in range(self.chunks_per_seq):
                a = c * self.streams_per_chunk
                out.append((s, a, min(a + self.streams_per_chunk, self.n_streams)))
        return out


def plan_step(cfg: Config, world: int) -> StepPlan:
    """Cut each sequence's M streams into chunks of at most `train.chunk_tokens` packed tokens,
    choosing the chunk count that makes a step fastest on `world` ranks: the critical path is
    (micro-steps per rank) x (tokens of the largest chunk), each chunk also re-encoding the n
    base tokens. With few ranks that is the fewest chunks; with more ranks than chunks, smaller
    chunks so that every rank has one (no rank runs a weight-0 repeat while others work)."""
    B = cfg.train.batch_size
    if cfg.thought.mode == "off":           # no streams: one base-only chunk per sequence
        return StepPlan(0, 0, 1, B, world)
    n, L = cfg.data.seq_len, cfg.thought.stream_len
    M = cfg.think_positions * cfg.thought.n_thoughts
    most = min(M, max(1, (cfg.train.chunk_tokens - n) // L))      # streams per chunk that fit
    best = None
    for count in range(math.ceil(M / most), M + 1):
        size = math.ceil(M / count)                                     # even chunks of this count
        count = math.ceil(M / size)
        cost = (math.ceil(B * count / world) * (n + size * L), count)     # then fewer chunks: less work
        if best is None or cost < best[0]:
            best = (cost, size, count)
    _, size, count = best
    return StepPlan(M, size, count, count * B, world)


def rollout_units(batch: int, positions: int, world: int) -> list[tuple[int, int, int]]:
    """The (sequence, first position, end position) units of a step's rollout, in order: whole
    sequences when there are at least as many as ranks; otherwise each sequence's positions cut
    into as many even blocks as it takes to give every rank a unit. Rank q takes the q-th run of
    ceil(units / world) of them (`units_of`)."""
    blocks = 1 if batch >= world else min(positions, -(-world // batch))
    size = -(-positions // blocks)
    return [(s, a, min(a + size, positions)) for s in range(batch) for a in range(0, positions, size)]


def units_of(units: list, rank: int, world: int) -> list:
    """Rank `rank`'s share of `units`: a contiguous run, padded with the last unit (whose result is
    dropped) so that every rank has as many."""
    per_rank = -(-len(units) // world)
    return [units[min(rank * per_rank + j, len(units) - 1)] for j in range(per_rank)]


def learn_share(plan: StepPlan, rank: int) -> list[tuple[tuple[int, int, int], float]]:
    """Rank `rank`'s learn micro-steps: ((sequence, first stream, end stream), weight). Chunk c goes
    to rank c % world; a rank short of chunks repeats the first one with weight 0, so that every
    rank runs plan.grad_accum micro-steps."""
    chunks = plan.chunks()
    mine = [(c, 1.0) for c in chunks[rank::plan.world]]
    return mine + [(chunks[0], 0.0)] * (plan.grad_accum - len(mine))


def eval_share(count: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s held-out sequences r, r + W, ..., padded by repeating its last one (dropped by
    `rank_major_order`) so that every rank scores ceil(count / world)."""
    mine = list(range(rank, count, world))
    per_rank = -(-count // world)
    return mine + [mine[-1] if mine else 0] * (per_rank - len(mine))


def rank_major_order(count: int, world: int) -> tuple[list[bool], list[int]]:
    """Rows gathered rank after rank (rank q's `eval_share`, in order) -> (which rows to keep, the
    order that puts the kept ones back as sequences 0..count-1)."""
    per_rank = -(-count // world)
    seq = [r * world + q for q in range(world) for r in range(per_rank)]
    keep = [s < count for s in seq]
    kept = [s for s in seq if s < count]
    return keep, sorted(range(len(kept)), key=kept.__getitem__)
