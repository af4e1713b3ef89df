"""The training loop: rollout, chunked learn micro-steps, optimizer step, metrics,
held-out evaluation, checkpoints.

One optimizer step, on every rank:
  1. read the global batch (B sequences; every rank reads the same stream);
  2. roll out this rank's units of the batch (whole sequences, or blocks of positions when there
     are more ranks than sequences; schedule.rollout_units) with the model held gathered, sampling
     with noise hashed from (seed, step, sequence, position, thought, token): no thought depends
     on which rank or world size computed it; all-gather thoughts and rewards (small);
  3. run this rank's learn chunks (schedule.learn_share; every rank runs the same number of
     micro-steps);
  4. the loss of a chunk is normalised by the global counts of valid streams and base targets,
     so the sum of all chunks' losses is the loss of the whole batch, and the update is that of
     the whole batch, independent of the chunk size and the number of ranks
     (distributed.Strategy.backward_step).
Everything that talks to other ranks goes through distributed.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import torch

from . import checkpoint as ckpt
from .cli import to_yaml
from .config import Config, ConfigError
from .config import changes as config_changes
from .cpu_memory import keep_freed_memory
from .data import SequenceStream, check_source, heldout_sequences
from .distributed import Strategy, all_reduce, apply_optimizer_settings, gather_rows
from .ds_config import fill_ds_config, load_ds_json, resolve_dtype, zero_stage
from .hub import TINY_PREFIX, build_base
from .losses import Normalizer, base_target_mask, stream_validity
from .heldout import flat_metrics, focus_positions, line as heldout_line, token_focus
from .heldout_eval import VIEWER_PAGE, HeldoutEval
from .metrics import MetricsLogger, print0, progress
from .report import REPORT_PAGE, write_report
from .attention import auto_note, resolve_backend
from .model import QuietStarModel, filler_token_id, randomize_mixing_head, read_marker_file, set_thought_embeds
from .preemption import Preemption
from .learn import LearnOutput, base_pass, learn_pass
from .rollout import Rollout, oracle_thoughts, rollout, sequence_noise, step_positions
from .teacher import check_fits, teacher_thoughts
from .schedule import learn_share, plan_step, rollout_units, units_of

TEMPLATE_DIR = "hf_template"



class StepTotals:
    """The step's losses and mixing weights, summed over this rank's chunks (weighted: a repeat
    counts 0), then over the ranks."""
    KEYS = ("talk", "base", "reinforce", "read", "loss", "mix_w_sum", "mix_w_count")

    def __init__(self, device):
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)

    def add(self, out: LearnOutput, weight: float) -> None:
        w = out.mix_w.detach()[out.valid]
        self.sums += weight * torch.stack([out.losses["talk"].detach(), out.losses["base"].detach(),
                                           out.losses["reinforce"].detach(), out.losses["read"].detach(),
                                           out.loss.detach(),
                                           w.sum(), w.new_tensor(float(w.numel()))]).double()

    def over_ranks(self) -> dict[str, float]:
        return dict(zip(self.KEYS, all_reduce(self.sums).tolist()))


class TrainingError(ConfigError):
    """The run cannot go on (diverged): one line, exit code 2."""


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dist = Strategy(cfg)
        self.device_type, self.device = self.dist.device_type, self.dist.device
        self.rank, self.world = self.dist.rank, self.dist.world
        if self.device_type == "cpu":   # activations reuse freed heap blocks instead of fresh mmaps
            keep_freed_memory()
        # from here on a SIGUSR1/SIGTERM means "save and stop after the current step", not death
        self.preempt = Preemption(self.device)
        self.preempted_by = None
        requested = cfg.thought.attention_backend
        cfg.thought.attention_backend = resolve_backend(requested)
        self.backend_note = "" if requested != "auto" else \
            f" (auto on {self.device_type} -> {auto_note(self.device_type)})"
        ckpt.check_output_dir(cfg.train.output_dir, self.rank)     # bad paths and data fail before the model loads
        check_source(cfg.data.source, cfg.data.text_field)
        if cfg.eval.source is not None:
            check_source(cfg.eval.source, cfg.data.text_field, "eval.source")
        self.plan = plan_step(cfg, self.world)
        self.ds_config = fill_ds_config(load_ds_json(cfg.ds_config), cfg, self.plan, self.device_type)
        self.dtype = resolve_dtype(cfg, self.device_type)
        self.notes: list[str] = []          # start-up lines for the text log (it opens later)
        resume_path, meta, self.run_id = ckpt.begin(cfg.train.resume, cfg.train.output_dir,
                                                    cfg.train.checkpoint_hashes, self._note)
        reshard = meta is not None and meta["world_size"] != self.world
        if reshard:           # written by another number of ranks: loaded through DeepSpeed's universal form
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
            self._note(f"{resume_path} was written by {meta['world_size']} rank(s), now {self.world}: loading "
                       f"its universal form ({os.path.join(resume_path, ckpt.UNIVERSAL)}, made once)")
        # ZeRO-3: build real models partitioned (zero.Init). Tiny test models are built whole, so
        # that a seed gives the same initial weights under every ZeRO stage and in one process.
        if zero_stage(self.ds_config) == 3 and not cfg.model.name.startswith(TINY_PREFIX):
            self.dist.zero_init(self.ds_config)

        # a fresh run's marker file: a bad one says so before the model loads (its shape once it has)
        markers = None
        if cfg.model.thought_init_file and resume_path is None:
            markers = read_marker_file(cfg.model.thought_init_file)
        torch.manual_seed(cfg.train.seed)
        base, self.tokenizer = build_base(cfg.model.name, self.dtype, cfg.model.gguf_file, cfg.train.seed)
        if cfg.thought.mode == "teacher":
            try:
                check_fits(self.tokenizer, cfg.thought.thought_len)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        model = QuietStarModel.from_base(base, self.tokenizer, cfg.model.thought_init,
                                         mix_rule=cfg.model.mix_rule, mix_init=cfg.model.mix_init)
        if markers is not None:
            set_thought_embeds(model, markers, cfg.model.thought_init_file)
            self._note(f"thought markers start from {cfg.model.thought_init_file} (model.thought_init_file)")
        if cfg.model.mixing_init_std > 0:
            randomize_mixing_head(model, cfg.model.mixing_init_std, cfg.train.seed)
        if cfg.model.gradient_checkpointing:
            if hasattr(base, "activation_checkpointing_enable"):   # newer transformers; older: the else branch
                base.activation_checkpointing_enable({"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.loss_checkpointing = True
        self.engine = self.dist.build(model, self.ds_config)
        self.model: QuietStarModel = self.engine.module
        self.signature = self._signature()

        self.step, self.samples, self.bad_steps = 0, 0, 0
        data_state = None
        if resume_path is not None:
            ckpt.check_compatible(meta, self.signature, resume_path)
            ckpt.load(self.engine, resume_path, universal=reshard)
            ckpt.leave_branch(cfg.train.output_dir, meta["step"], self._note)
            self.step, self.samples, data_state = meta["step"], meta["samples"], meta["data_state"]
            changed = apply_optimizer_settings(self.engine, self.model, cfg, meta.get("config", {}))
            if changed:
                self._note(f"resuming with changed settings, applied from step {self.step} on (optimizer "
                           f"moments kept): {', '.join(changed)}")
            others = config_changes(meta.get("config", {}), cfg, skip={c.split(" ")[0] for c in changed}
                                    | {"train.resume"})
            if others:
                self._note(f"resuming with other settings than the checkpoint's, in effect from step {self.step} "
                           f"on: {', '.join(others)}")
        d, e = cfg.data, cfg.eval
        split = e.holdout_fraction if e.source is None else 0.0        # training never reads held-out text
        self.stream = SequenceStream(self.tokenizer, d.source, d.seq_len, d.pack, d.split, d.text_field,
                                     d.subset, d.seed, state=data_state, holdout=split)
        heldout = heldout_sequences(self.tokenizer, d, e)                       # (D, n) ids, mask
        self.filler_id = filler_token_id(self.tokenizer, cfg.thought.filler)
        self.evaluate = HeldoutEval(cfg, self.engine, self.dist, self.tokenizer, heldout, self.filler_id)
        self.last_eval: dict | None = None
        self.resumed_from = resume_path
        self.logger = MetricsLogger(cfg.train.output_dir, cfg.train.wandb, cfg.train.wandb_project,
                                    config=dataclasses.asdict(cfg))
        for line in self.notes:
            self.logger.line(line)
        if self.rank == 0:
            self._write_template()

    # ---- setup helpers --------------------------------------------------------------------
    def _note(self, msg: str) -> None:
        print0(f"qstar_ds: {msg}")
        self.notes.append(msg)

    def _signature(self) -> dict:
        c = self.model.base.config
        t = self.cfg.thought
        return {"model": self.cfg.model.name, "model_type": c.model_type, "hidden_size": c.hidden_size,
                "num_hidden_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                "sot_id": self.model.sot_id, "eot_id": self.model.eot_id, "thought_len": t.thought_len,
                "n_thoughts": t.n_thoughts, "talk_len": t.talk_len, "seq_len": self.cfg.data.seq_len,
                "mix": self.model.mix_spec}

    def _write_template(self) -> None:
        """Base config + tokenizer (with thought tokens): what tools/export_hf.py rebuilds from."""
        path = os.path.join(self.cfg.train.output_dir, TEMPLATE_DIR)
        os.makedirs(path, exist_ok=True)
        self.model.base.config.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(self.cfg.train.output_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(self.cfg))

    def describe(self) -> str:
        p, c = self.plan, self.cfg
        return (f"qstar_ds: {self.world} rank(s) on {self.device_type}, {self.dtype}, ZeRO stage "
                f"{zero_stage(self.ds_config)}; model {c.model.name}; n={c.data.seq_len} r={c.thought.n_thoughts} "
                f"thought_len={c.thought.thought_len} K={c.thought.talk_len}"
                + (f", thinking at {c.thought.positions} of {c.data.seq_len - c.thought.talk_len} positions per step"
                   if c.thought.positions else "")
                + (f" (first those before tokens matching {c.thought.position_focus!r})"
                   if c.thought.position_focus else "") + f"; batch {c.train.batch_size} seq/step, "
                f"{p.n_streams} streams/seq in {p.chunks_per_seq} chunk(s) of <= {p.streams_per_chunk} "
                f"-> {p.grad_accum} micro-step(s)/rank/step; attention backend {c.thought.attention_backend}{self.backend_note}"
                + (f"; resumed from {self.resumed_from} (step {self.step})" if self.resumed_from else ""))

    # ---- one optimizer step -----------------------------------------------------------------
    def _positions(self, n: int, prefer: torch.Tensor | None = None) -> torch.Tensor:
        """(P,) the positions that think at this step: all, or thought.positions of them drawn
        for this step (rollout.step_positions; the same on every rank and after a resume), the
        `prefer`red ones (_preferred) first."""
        return step_positions(n, self.cfg.thought.talk_len, self.cfg.thought.positions, self.cfg.train.seed,
                              self.step, self.device, prefer=prefer)

    def _preferred(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor | None:
        """(n - K,) bool: position i is preferred when x_{i+1} of some sequence is marked by
        thought.position_focus; None without one."""
        pattern = self.cfg.thought.position_focus
        if not pattern or not self.cfg.thought.positions:
            return None
        marked = token_focus(x.cpu(), self.tokenizer, pattern) & x_mask.cpu().bool()          # (B, n)
        return marked[:, 1:].any(0)[:x.shape[1] - self.cfg.thought.talk_len]   # every rank holds the whole batch

    def _reinforced(self, x: torch.Tensor, x_mask: torch.Tensor, anchor: torch.Tensor, valid: torch.Tensor
                    ) -> torch.Tensor | None:
        """(B, M) bool: the streams whose next token x_{i+1} thought.reinforce_focus marks (the
        only ones the REINFORCE term trains); None without a pattern."""
        pattern = self.cfg.thought.reinforce_focus
        if not pattern or anchor.shape[1] == 0:
            return None
        marked = token_focus(x.cpu(), self.tokenizer, pattern) & x_mask.cpu().bool()          # (B, n)
        return focus_positions(marked, anchor.cpu(), valid.cpu()).to(x.device)

    def _rollouts(self, x: torch.Tensor, x_mask: torch.Tensor, positions: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> thoughts (B, M, t), rewards (B, M): the step's rollout after `positions` (P,), cut into
        units (whole sequences, or blocks of positions when there are more ranks than sequences:
        schedule.rollout_units),
        each rank rolling out its units and all-gathering the results. The sampling noise is a
        hash of (sequence, position, thought, token) (rollout.Noise), so no thought depends on
        the cut or the world size. With the model held gathered (Strategy.rollout_held), a rank's units
        of the same positions go through in batches of train.rollout_batch; otherwise one at a
        time (every rank then runs the same number of forwards, as ZeRO-3's gathers need)."""
        B, n = x.shape
        t, r = self.cfg.thought.thought_len, self.cfg.thought.n_thoughts
        units = rollout_units(B, positions.numel(), self.world)
        mine = units_of(units, self.rank, self.world)
        width = max(b - a for _, a, b in units) * r
        unit_thoughts = x.new_zeros(len(mine), width, t)
        unit_rewards = torch.zeros(len(mine), width, device=x.device)
        hold = self.dist.rollout_held()
        size = (self.cfg.train.rollout_batch or len(mine)) if hold is not None else 1
        groups: dict[tuple[int, int], list[int]] = {}
        for j, (_, a, b) in enumerate(mine):
            groups.setdefault((a, b), []).append(j)
        with hold or contextlib.nullcontext():
            for (a, b), js in groups.items():
                for c in range(0, len(js), size):
                    part = js[c:c + size]
                    seqs = [mine[j][0] for j in part]
                    ro = Rollout(**self.engine(fn=rollout, cfg=self.cfg.thought, input_ids=x[seqs],
                                               attention_mask=x_mask[seqs], positions=positions[a:b],
                                               generator=sequence_noise(self.cfg.train.seed, self.step, seqs,
                                                                        self.device)))
                    unit_thoughts[part, :(b - a) * r] = ro.thoughts
                    unit_rewards[part, :(b - a) * r] = ro.rewards.float()
        unit_thoughts, unit_rewards = (gather_rows(v)[:len(units)] for v in (unit_thoughts, unit_rewards))
        thoughts, rewards = x.new_zeros(B, positions.numel() * r, t), torch.zeros(B, positions.numel() * r,
                                                                                   device=x.device)
        for u, (seq, a, b) in enumerate(units):
            thoughts[seq, a * r:b * r] = unit_thoughts[u, :(b - a) * r]
            rewards[seq, a * r:b * r] = unit_rewards[u, :(b - a) * r]
        return thoughts, rewards

    def _thoughts(self, x: torch.Tensor, x_mask: torch.Tensor, positions: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """thoughts (B, M, t) and rewards (B, M) of this step after `positions`: sampled and scored
        (quiet_star), the filler token everywhere with reward 0 (filler), the true continuation
        where thought.oracle_focus marks the next token, with reward 0 (oracle), the units step where
        the context asks for a sum, with reward 1 (teacher: the REINFORCE term is the step's NLL),
        or none (off)."""
        B, n = x.shape
        t, mode = self.cfg.thought.thought_len, self.cfg.thought.mode
        if mode == "quiet_star":
            return self._rollouts(x, x_mask, positions)
        M = self.plan.n_streams
        anchor = positions.repeat_interleave(self.cfg.thought.n_thoughts)[None].expand(B, -1)[:, :M]
        if mode == "oracle":
            thoughts = oracle_thoughts(x, x_mask, anchor, self._oracle_marked(x, x_mask), t, self.filler_id)
        elif mode == "teacher":
            thoughts, on = teacher_thoughts(x.cpu(), x_mask.cpu(), anchor.cpu(), self.tokenizer, t, self.filler_id)
            return thoughts.to(x.device), on.to(x.device, torch.float32)
        else:
            thoughts = x.new_full((B, M, t), self.filler_id if mode == "filler" else 0)
        return thoughts, torch.zeros(B, M, device=x.device)

    def _oracle_marked(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor | None:
        """(B, n) bool: the tokens thought.oracle_focus marks (None: no pattern, every token)."""
        pattern = self.cfg.thought.oracle_focus
        return token_focus(x.cpu(), self.tokenizer, pattern) & x_mask.cpu().bool() if pattern else None

    def _learn(self, x, x_mask, seq: int, a: int, b: int, anchor, thoughts, rewards, norm: Normalizer) -> LearnOutput:
        """The learn micro-step of streams a..b of sequence `seq` (off mode: its base NLL)."""
        one = dict(cfg=self.cfg.thought, input_ids=x[seq:seq + 1], attention_mask=x_mask[seq:seq + 1], norm=norm)
        if self.cfg.thought.mode == "off":
            return LearnOutput(**self.engine(fn=base_pass, **one))
        return LearnOutput(**self.engine(fn=learn_pass, anchor=anchor[seq:seq + 1, a:b],
                                         thoughts=thoughts[seq:seq + 1, a:b], rewards=rewards[seq:seq + 1, a:b],
                                         base_loss=(a == 0), **one))

    def train_step(self, x: torch.Tensor, x_mask: torch.Tensor) -> tuple[dict, tuple]:
        """One optimizer step (module docstring). -> (metrics, what the thought table shows)."""
        x, x_mask = x.to(self.device), x_mask.to(self.device)
        t0 = time.perf_counter()
        prefer = self._preferred(x, x_mask)                                            # (n - K,) or None
        positions = self._positions(x.shape[1], prefer)                                # (P,)
        thoughts, rewards = self._thoughts(x, x_mask, positions)                       # (B, M, t), (B, M)
        t_rollout = time.perf_counter() - t0
        anchor, valid, norm = self._streams(x_mask, positions)                         # (B, M), (B, M)
        trained = self._reinforced(x, x_mask, anchor, valid)                           # (B, M) bool or None
        learned = rewards if trained is None else torch.where(trained, rewards, 0.0)   # REINFORCE's rewards
        totals = StepTotals(self.device)
        for (seq, a, b), weight in learn_share(self.plan, self.rank):
            out = self._learn(x, x_mask, seq, a, b, anchor, thoughts, learned, norm)
            self.dist.backward_step(out.loss, weight)
            totals.add(out, weight)
        metrics = self._step_metrics(totals, rewards[valid], x.numel(), time.perf_counter() - t0, t_rollout)
        if prefer is not None:     # how many of the positions that thought were the preferred ones
            metrics["think_focus_positions"] = int(prefer[positions.cpu()].sum())
        if trained is not None:    # the share of the step's streams that REINFORCE trained
            metrics["reinforce_focus_frac"] = float(trained[valid].float().mean()) if valid.any() else 0.0
        return metrics, (x, thoughts, rewards, anchor, valid)

    def _streams(self, x_mask: torch.Tensor, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, Normalizer]:
        """The step's stream anchors (B, M) after `positions` (P,), which streams have a full talk
        window (B, M), and the normaliser of the whole step's losses (global counts)."""
        B, n = x_mask.shape
        anchor = positions.repeat_interleave(self.cfg.thought.n_thoughts)[None].expand(B, -1)
        anchor = anchor[:, :self.plan.n_streams]                                   # off: no streams
        valid = stream_validity(x_mask.bool(), anchor, self.cfg.thought.talk_len)
        return anchor, valid, Normalizer(float(valid.sum()), float(base_target_mask(x_mask.bool()).sum()))

    def _step_metrics(self, totals: "StepTotals", rewards: torch.Tensor, tokens: int, seconds: float,
                      rollout_seconds: float) -> dict:
        """The step's losses summed over every rank's chunks, reward statistics, mixing weight,
        gradient norm, speed and peak memory."""
        s = totals.over_ranks()
        rss, gpu = self.dist.peak_memory_gb()
        gn = self.dist.grad_norm()
        return {"loss": s["loss"], "loss_talk": s["talk"], "loss_base": s["base"], "loss_reinforce": s["reinforce"],
                **({"loss_read": s["read"]} if self.cfg.thought.w_read > 0 else {}),
                "reward_mean": rewards.mean().item() if rewards.numel() else 0.0,
                "reward_pos_frac": (rewards > 0).float().mean().item() if rewards.numel() else 0.0,
                "mix_w_mean": s["mix_w_sum"] / s["mix_w_count"] if s["mix_w_count"] > 0 else 0.0,
                "grad_norm": gn if gn is not None else float("nan"),
                "lr": self.engine.get_lr()[0], "tokens_per_s": tokens / seconds, "step_time_s": seconds,
                "rollout_time_s": rollout_seconds, "peak_rss_gb": rss, "peak_gpu_gb": gpu}

    def _thought_rows(self, x, thoughts, rewards, anchor, valid, k: int = 8) -> list[dict]:
        rows = []
        idx = valid[0].nonzero().flatten()
        for m in idx[torch.argsort(rewards[0, idx], descending=True)[:k]].tolist():
            i = int(anchor[0, m])
            rows.append({"position": i, "context": self.tokenizer.decode(x[0, max(0, i - 8):i + 1]),
                         "thought": self.tokenizer.decode(thoughts[0, m]), "reward": float(rewards[0, m])})
        return rows

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg.train
        print0(self.describe())
        print0("resolved config:\n" + to_yaml(self.cfg))
        self.logger.line(self.describe())
        self.engine.train()
        bar = progress(cfg.max_steps, self.step)
        last = {}
        try:
            last = self._loop(cfg, bar, self.preempt)
        finally:
            bar.close()
        if self.last_eval is not None and self.step == cfg.max_steps:
            print0(self.result_lines())
        return last

    def result_lines(self) -> str:
        """What a finished run prints last: the held-out result and where to look."""
        out = self.cfg.train.output_dir
        txt = heldout_line(f"qstar_ds: result ({self.cfg.thought.mode}, {self.step} steps):", self.last_eval)
        txt += f"\nqstar_ds: report {os.path.join(out, REPORT_PAGE)}"
        if self.cfg.thought.mode != "off":
            txt += f"; thought viewer {os.path.join(out, VIEWER_PAGE)}"
        return txt

    def _loop(self, cfg, bar, preempt: Preemption) -> dict:
        last = {}
        while self.step < cfg.max_steps:
            x, x_mask = self.stream.next_batch(cfg.batch_size)
            skipped_before = self.engine.skipped_steps
            metrics, sample = self.train_step(x, x_mask)
            self.step += 1
            self.samples += cfg.batch_size
            bad = self._check_finite(metrics, cfg.max_bad_steps, self.engine.skipped_steps > skipped_before)
            last = metrics
            evaluated = (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_steps
            if evaluated:
                ev = self.last_eval = self.evaluate(self.step, final=self.step == cfg.max_steps)
                print0(heldout_line(f"eval step {self.step}:", ev))
                self.logger.line(heldout_line(f"eval step {self.step}:", ev))
                metrics = {**metrics, **flat_metrics(ev)}
            if evaluated or self.step % cfg.log_every == 0:
                self.logger.log(self.step, {"samples": self.samples, **metrics})
            if evaluated and self.rank == 0:
                write_report(cfg.output_dir)
            if cfg.thought_table_every and self.step % cfg.thought_table_every == 0 and self.rank == 0:
                self.logger.log_thoughts(self.step, self._thought_rows(*sample))
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}", talk=f"{metrics['loss_talk']:.3f}",
                            base=f"{metrics['loss_base']:.3f}", rl=f"{metrics['loss_reinforce']:.3g}",
                            rew=f"{metrics['reward_mean']:.3g}", pos=f"{metrics['reward_pos_frac']:.2f}",
                            w=f"{metrics['mix_w_mean']:.3g}", gn=f"{metrics['grad_norm']:.3g}",
                            lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            saved = not bad and ((cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.max_steps)
            if saved:
                self.save()
            if preempt.should_stop():                    # every rank, same step
                if not saved and not bad:
                    self.save()
                self.preempted_by = preempt.name
                msg = f"pre-empted by {preempt.name} after step {self.step}: checkpoint saved, exiting"
                print0(msg)
                self.logger.line(msg)
                break
        return last

    def _check_finite(self, metrics: dict, max_bad: int, skipped: bool) -> bool:
        """True if this step's loss or gradient norm is not finite (the same on every rank: both
        are global). DeepSpeed skips such an update; where it applied it anyway, or after more than
        `max_bad` such steps in a row, the run stops with one line (no checkpoint of a bad step)."""
        import math
        norm_known = self.dist.grad_norm() is not None      # ZeRO stage 0 does not compute it
        if math.isfinite(metrics["loss"]) and (math.isfinite(metrics["grad_norm"]) or not norm_known):
            self.bad_steps = 0
            return False
        self.bad_steps += 1
        what = f"loss {metrics['loss']:.4g}, gradient norm {metrics['grad_norm']:.4g}"
        newest = ckpt.complete_checkpoints(os.path.join(self.cfg.train.output_dir, ckpt.CKPT_SUBDIR))
        last = f"the newest checkpoint is {newest[-1][1]}" if newest else "no checkpoint was written"
        if not skipped:
            raise TrainingError(f"step {self.step}: {what}, and DeepSpeed applied the update (the weights may "
                                f"be non-finite): stopped without saving; {last}")
        msg = f"warning: step {self.step}: {what}: update skipped ({self.bad_steps} in a row)"
        print0(f"qstar_ds: {msg}")
        self.logger.line(msg)
        if self.bad_steps > max_bad:
            raise TrainingError(f"{self.bad_steps} steps in a row with a non-finite loss or gradient (last: step "
                                f"{self.step}, {what}; train.max_bad_steps={max_bad}): stopped without saving; "
                                f"{last}. Lower optim.lr or check the data")
        return True

    def save(self) -> str:
        meta = {"step": self.step, "samples": self.samples, "data_state": self.stream.state(),
                "config": dataclasses.asdict(self.cfg), "signature": self.signature,
                "world_size": self.world, "dtype": str(self.dtype).removeprefix("torch."), "run_id": self.run_id,
                "parent": self.resumed_from,
                "template": os.path.abspath(os.path.join(self.cfg.train.output_dir, TEMPLATE_DIR))}
        path = ckpt.save(self.engine, self.cfg.train.output_dir, self.step, meta, self.cfg.train.keep_last,
                         self.cfg.train.checkpoint_hashes)
        self.logger.line(f"checkpoint {path}")
        return path

    def close(self) -> None:
        self.preempt.restore()
        self.logger.close()
