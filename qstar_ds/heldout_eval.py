"""The trainer's held-out evaluation: the held-out sequences scored with and without a thought
after every position (heldout.py), sharded over the ranks (schedule.eval_share), optional
GSM8K/CSQA slices (evaluate.py), and what it writes: eval/step_XXXXXXXX.json and the thought
viewer page of the first held-out sequence.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import torch

from .config import Config, ConfigError, ThoughtConfig
from .distributed import Strategy, gather_rows
from .heldout import focus_positions, focus_summary, sequence_nll, summarize, token_focus, token_scores, top_positions
from .learn import LearnOutput, base_pass
from .losses import stream_validity
from .metrics import progress
from .rollout import Rollout, default_positions, oracle_thoughts, rollout
from .teacher import sampled_where_asked
from .schedule import eval_share, rank_major_order
from .viewer import page_data, render

VIEWER_PAGE = "thoughts.html"


def sequence_generator(seed: int, step: int, seq: int, device) -> torch.Generator:
    """The sampling generator of global sequence `seq` at optimizer step `step`."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1_000_033 + seq)
    return g


def load_task_items(ec) -> dict:
    """The GSM8K/CSQA slices of eval.gsm8k / eval.csqa items (a bad path fails at start, not at the end)."""
    from .tasks import TaskError, load_items
    try:
        return {t: load_items(t, None, ec.task_data_dir, k) for t, k in (("gsm8k", ec.gsm8k), ("csqa", ec.csqa)) if k}
    except TaskError as e:
        raise ConfigError(f"eval.{'gsm8k' if 'gsm8k' in str(e) else 'csqa'}: {e}") from None


class HeldoutEval:
    """`evaluate(step)` scores the run's held-out sequences `sequences` ((D, n) ids and mask) with
    the engine's current weights; collective (every rank calls it)."""

    def __init__(self, cfg: Config, engine, dist: Strategy, tokenizer, sequences, filler_id: int):
        self.cfg, self.engine, self.dist, self.tokenizer = cfg, engine, dist, tokenizer
        self.heldout, self.filler_id = sequences, filler_id
        self.task_items = load_task_items(cfg.eval)
        self.step = 0

    def _eval_config(self) -> ThoughtConfig:
        """The training thought settings with one thought per position at the evaluation temperature
        (no rewards: one thought has none to compare, so none come from the read log-probs)."""
        return dataclasses.replace(self.cfg.thought, n_thoughts=1, temperature=self.cfg.eval.temperature,
                                   top_k=0, reward="mixed")

    @torch.no_grad()
    def __call__(self, step: int, final: bool = False) -> dict:
        """Score the held-out sequences (heldout.py), sharded over ranks: rank r takes sequences
        r, r + W, ... in batches; every rank runs the same number of forwards (a short rank
        repeats a sequence whose result is dropped). -> summary (also written to
        output_dir/eval/step_XXXXXXXX.json and the viewer page on rank 0)."""
        self.step = step
        ec, cfg = self.cfg.eval, self._eval_config()
        ids, mask = (v.to(self.dist.device) for v in self.heldout)                   # (D, n)
        D, n = ids.shape
        mine = eval_share(D, self.dist.rank, self.dist.world)
        per_rank = len(mine)
        bs = max(1, ec.batch_size // self.dist.world)
        positions = default_positions(n, cfg.talk_len, self.dist.device)
        self.engine.eval()
        parts: dict[str, list] = {}
        bar = progress(-(-per_rank // bs), 0, desc="held-out eval", unit="batch")
        with self.dist.rollout_held() or contextlib.nullcontext():
            for a in range(0, per_rank, bs):
                for k, v in self._score(cfg, ids, mask, mine[a:a + bs], positions).items():
                    parts.setdefault(k, []).append(v)
                bar.update(1)
        bar.close()
        self.engine.train()
        full = self._gather_sequences({k: torch.cat(v) for k, v in parts.items()}, D)   # (D, P) each
        m = summarize(full, cfg.talk_len)
        m.update(talk_len=cfg.talk_len, temperature=cfg.temperature)
        focus = self._focus(full, ids.cpu(), positions.cpu())
        m.update({f"focus_{k}": v for k, v in (focus or {}).items() if not k.startswith("sequence_")})
        if (final or ec.tasks_every_eval) and self.task_items:
            m.update(self._task_slices(cfg))
        if self.dist.rank == 0:
            self._write_eval(m, full, ids.cpu(), positions.cpu(), focus)
        return m

    def _focus(self, full: dict, ids: torch.Tensor, positions: torch.Tensor) -> dict | None:
        """heldout.focus_summary of the tokens eval.focus (default thought.position_focus) marks."""
        pattern = self.cfg.eval.focus if self.cfg.eval.focus is not None else self.cfg.thought.position_focus
        if not pattern:
            return None
        s = {k: v.cpu() for k, v in full.items() if k != "thoughts"}
        where = focus_positions(token_focus(ids, self.tokenizer, pattern), positions[None].expand(ids.shape[0], -1),
                                s["valid"])
        return {"pattern": pattern, **focus_summary(s, where)}

    def _score(self, cfg: ThoughtConfig, ids, mask, rows: list[int], positions) -> dict[str, torch.Tensor]:
        """heldout.token_scores (and the thoughts) of held-out sequences `rows`: one thought after
        every position (the filler in filler mode; in oracle mode the true continuation where
        thought.oracle_focus marks the next token, as in training; in teacher mode the model's own
        thought where the context asks for a sum, the filler elsewhere; none in off mode, where
        "with thoughts" is the plain model)."""
        x, x_mask = ids[rows], mask[rows]
        mode, t = self.cfg.thought.mode, cfg.thought_len
        if mode == "off":
            base_logp = LearnOutput(**self.engine(fn=base_pass, cfg=cfg, input_ids=x, attention_mask=x_mask)).base_logp
            anchor = positions[None].expand(len(rows), -1)                       # (b, P)
            sc = token_scores(base_logp, None, anchor, stream_validity(x_mask.bool(), anchor, cfg.talk_len), None,
                              cfg.talk_len)
            return {**sc, "thoughts": x.new_zeros(*anchor.shape, t)}
        fixed = x.new_full((len(rows), positions.numel(), t), self.filler_id) if mode == "filler" else None
        if mode == "oracle":
            pattern = self.cfg.thought.oracle_focus
            marked = token_focus(x.cpu(), self.tokenizer, pattern) & x_mask.cpu().bool() if pattern else None
            fixed = oracle_thoughts(x, x_mask, positions[None].expand(len(rows), -1), marked, t, self.filler_id)
        if mode == "teacher":
            fixed = sampled_where_asked(x.cpu(), x_mask.cpu(), positions[None].expand(len(rows), -1).cpu(),
                                        self.tokenizer, t, self.filler_id).to(x.device)
        ro = Rollout(**self.engine(fn=rollout, cfg=cfg, input_ids=x, attention_mask=x_mask, positions=positions,
                                   generator=sequence_generator(self.cfg.eval.seed, -1, rows[0], self.dist.device),
                                   base_logprobs=True, thoughts=fixed, partial=mode == "teacher"))
        return {**token_scores(ro.base_logp, ro.talk_logp, ro.anchor, ro.valid, ro.mix_w), "thoughts": ro.thoughts}

    def _gather_sequences(self, local: dict[str, torch.Tensor], D: int) -> dict[str, torch.Tensor]:
        """Every rank's rows (its schedule.eval_share) -> all D sequences in order."""
        keep, order = (torch.tensor(v) for v in rank_major_order(D, self.dist.world))
        return {k: gather_rows(v)[keep.to(v.device)][order.to(v.device)] for k, v in local.items()}

    def _task_slices(self, cfg: ThoughtConfig) -> dict:
        """GSM8K/CSQA soft scores with and without thoughts on small slices (qstar_ds.evaluate).
        Every rank scores every item: under ZeRO-3 all ranks must run the same forwards."""
        from .evaluate import EvalSettings, run
        self.engine.eval()
        res = run(self.engine.module, self.tokenizer, cfg, list(self.task_items), [False, True],
                  EvalSettings(batch_size=self.cfg.eval.batch_size), self.task_items, self.dist.device,
                  progress=self.dist.rank == 0)
        self.engine.train()
        out = {}
        for r in res["results"]:
            key = f"{r['task']}_soft_{'thoughts' if r['thoughts'] else 'base'}"
            out[key], out[key + "_ci95"] = r["soft"], list(r["soft_ci95"])
        return out

    def _write_eval(self, m: dict, full: dict, ids: torch.Tensor, positions: torch.Tensor,
                    focus: dict | None = None) -> None:
        """eval/step_XXXXXXXX.json (summary, per-sequence NLLs with and without the first scored
        position and on the focus tokens, top positions), thoughts.html (the viewer page of the
        first held-out sequence) and report.html."""
        out_dir = self.cfg.train.output_dir
        anchor = positions[None].expand(ids.shape[0], -1)
        record = {"step": self.step, "mode": self.cfg.thought.mode, "summary": m,
                  "sequence_nll_base": sequence_nll(full, False).tolist(),
                  "sequence_nll_thoughts": sequence_nll(full, True).tolist(),
                  "sequence_nll_base_rest": sequence_nll(full, False, skip_first=True).tolist(),
                  "sequence_nll_thoughts_rest": sequence_nll(full, True, skip_first=True).tolist(),
                  "top": [] if self.cfg.thought.mode == "off" else
                  top_positions({k: v.cpu() for k, v in full.items() if k != "thoughts"}, full["thoughts"].cpu(),
                                ids, self.tokenizer, anchor=anchor, following=self.cfg.thought.talk_len)}
        if focus is not None:
            record.update(sequence_nll_base_focus=focus["sequence_nll_base"],
                          sequence_nll_thoughts_focus=focus["sequence_nll_thoughts"])
        os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
        path = os.path.join(out_dir, "eval", f"step_{self.step:08d}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)
        if self.cfg.thought.mode != "off":
            self._write_viewer(full, ids, positions)

    def _write_viewer(self, full: dict, ids: torch.Tensor, positions: torch.Tensor) -> None:
        K, tok = self.cfg.thought.talk_len, self.tokenizer
        pieces = [tok.decode([i]) for i in ids[0].tolist()]
        streams = [{"position": int(positions[p]), "text": tok.decode(full["thoughts"][0, p].tolist()),
                    "gain": float(full["mixed_win"][0, p] - full["base_win"][0, p]), "reward": 0.0,
                    "w": float(full["w"][0, p])}
                   for p in range(positions.numel()) if bool(full["valid"][0, p])]
        meta = (f"step {self.step}, held-out sequence 0 ({self.cfg.thought.mode}); one thought of "
                f"{self.cfg.thought.thought_len} tokens per position at temperature {self.cfg.eval.temperature}, "
                f"gain over the next {K} tokens; rewards are not computed in evaluation (0)")
        with open(os.path.join(self.cfg.train.output_dir, VIEWER_PAGE), "w") as f:
            f.write(render(page_data(pieces, streams, K, 10, meta), f"step {self.step}"))
