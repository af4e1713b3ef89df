"""Fit the <|startofthought|> vector so that the untrained model, after it, goes on with the text.

    python tools/fit_thought_markers.py --data ../shared/data/owm_sample/text.jsonl --data_seeds 0,1 \
        --out markers.safetensors
    python qstar_ds/train.py ... --model.thought_init_file markers.safetensors

Why: a thought is sampled after <sot>, and the marker starts as some token's embedding
(model.thought_init). At 135M every such start we probed (tools/thought_init_probe.py) makes the
policy give the text's next token an NLL about twice its NLL without the marker, so REINFORCE
almost never sees a thought that says what comes next. This tool fits only the <sot> vector (the
whole model frozen, <eot> left at its init) to maximise the policy's log-likelihood of the true
next thought_len tokens as a thought (teacher-forced, temperature 1, every position whose talk
window fits, the training layout), i.e. a marker after which the model thinks the text's
continuation as well as it can predict it. `--eot` fits <eot> as well, on the NLL of the talk
targets from the state after the true continuation as a thought (the reader; added to the loss):
a transparent <sot> alone makes the thought read like the text itself, after which the untrained
model no longer repeats its first token.

`--target steps` fits to thought.mode=teacher's thoughts instead (qstar_ds/teacher.py): only at
the positions whose context asks for a sum ("18 + 16 =", digits so far), the units step "8+6=14"
padded with the filler, the target the teacher arm trains the whole model on. It asks whether
the frozen model can be steered by one vector into writing the step (a policy that computes from
step 0, at no cost to the shared weights), and reports how often its own thought (sampled at
--temperature) writes the step on held-out windows before and after. It reads only documents on the training side of every
seed in --data_seeds (the runs that will use the file never evaluate on them), and prints the
policy's NLL of the true continuation on the held-out windows of the first seed before and after.
Writes a .safetensors file with the (2, hidden) tensor `thought_embeds` and what made it
(metadata).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qstar_ds.config import ConfigError, DataConfig, EvalConfig, ThoughtConfig  # noqa: E402
from qstar_ds.data import DataError, SequenceStream, first_sequences, heldout_sequences, is_heldout  # noqa: E402
from qstar_ds.layout import Layout  # noqa: E402
from qstar_ds.learn import stream_ids  # noqa: E402
from qstar_ds.model import MARKER_KEY, filler_token_id  # noqa: E402
from qstar_ds.rollout import default_positions, rollout  # noqa: E402
from qstar_ds.losses import stream_validity  # noqa: E402
from qstar_ds.talk import logprobs, read_logprobs  # noqa: E402
from qstar_ds.teacher import check_fits, sampled_where_asked, teacher_thoughts, writes_step  # noqa: E402


class TrainingSideStream(SequenceStream):
    """A SequenceStream over the documents that no seed in `seeds` holds out."""

    def __init__(self, *args, seeds: list[int], fraction: float, **kwargs):
        self.seeds, self.fraction = seeds, fraction
        super().__init__(*args, **kwargs)

    def _next_doc(self) -> tuple[int, str]:
        while True:
            index, text = super()._next_doc()
            if not any(is_heldout(text, self.fraction, s) for s in self.seeds):
                return index, text


def continuation(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, t: int, pad: int):
    """(B, n) ids and mask, (P,) positions -> (B, P, t) x_{i+1..i+t} after each position i (`pad`
    past the window and on padding) and (B, P, t) bool: which of them are real tokens."""
    idx = positions[:, None] + 1 + torch.arange(t)                                  # (P, t)
    return (torch.nn.functional.pad(ids.masked_fill(~mask.bool(), pad), (0, t), value=pad)[:, idx],
            torch.nn.functional.pad(mask, (0, t), value=0)[:, idx].bool())


def policy_nll(model, cfg: ThoughtConfig, ids: torch.Tensor, mask: torch.Tensor, pad: int,
               with_reader: bool = False, steps=None) -> dict:
    """The policy's (temperature 1) NLL of the true continuation as the thought after every
    position whose talk window fits, in the training layout (learn.learn_pass's thought log-probs),
    and the base NLL of the next token. -> {"loss": mean NLL per real thought token (with grad),
    "first": mean NLL of x_{i+1} as the first thought token, "base": mean base NLL of x_{i+1},
    "count": how many positions were scored}; `with_reader` adds "reader": the mean NLL of the K
    talk targets from the post-thought states alone after that true thought (learn_pass's read
    log-probs; with grad) and "reader_first" (x_{i+1}). `steps` = (tokenizer, filler id): the
    thought is thought.mode=teacher's (the units step padded with the filler, all t tokens its
    targets) and only the positions whose context asks for a sum are scored ("first": the step's
    first token); with none in the batch, "count" is 0 and the rest NaN."""
    B, n = ids.shape
    positions = default_positions(n, cfg.talk_len, ids.device)
    anchor = positions[None].expand(B, -1).contiguous()                             # (B, P)
    if steps is None:
        thoughts, real = continuation(ids, mask, positions, cfg.thought_len, pad)     # (B, P, t)
        real = real & mask.bool()[:, positions, None]
        scored = real[..., 0]                                                       # (B, P)
    else:
        thoughts, scored = teacher_thoughts(ids, mask, anchor, steps[0], cfg.thought_len, steps[1])
        keep = scored.any(0)                  # streams only where some row asks for a sum (cheaper)
        positions, anchor, thoughts, scored = positions[keep], anchor[:, keep], thoughts[:, keep], scored[:, keep]
        real = scored[..., None].expand_as(thoughts)
        if not keep.any():
            nan = torch.tensor(float("nan"))
            return {"loss": nan, "first": nan, "base": nan, "count": 0,
                    **({"reader": nan, "reader_first": nan} if with_reader else {})}
    L = cfg.thought_len + cfg.talk_len + 1
    layout = Layout.packed(mask.bool(), anchor, L, backend=cfg.attention_backend, talk_at=cfg.talk_at)
    x = torch.cat([ids, stream_ids(ids, anchor, thoughts, model.sot_id, model.eot_id, cfg.talk_len).flatten(1)], 1)
    h = model.hidden(x, layout)                                                     # (B, S, H)
    h_st = h[:, n:].unflatten(1, (anchor.shape[1], L))                              # (B, P, L, H)
    nll = -logprobs(model, h_st[:, :, :cfg.thought_len], thoughts, 1.0, cfg.loss_chunk_tokens)  # (B, P, t)
    w = real.to(nll.dtype)
    out = {"loss": (nll * w).sum() / w.sum().clamp(min=1), "first": nll[..., 0][scored].mean().detach(),
           "count": int(scored.sum())}
    if with_reader:
        valid = stream_validity(mask.bool(), anchor, cfg.talk_len) & (scored if steps is not None else True)  # (B, P)
        read = -read_logprobs(model, h_st[:, :, cfg.thought_len + 1:], ids, anchor, cfg.loss_chunk_tokens)  # (B, P, K)
        out["reader"] = read[valid].mean()
        out["reader_first"] = read[..., 0][valid].mean().detach()
    with torch.no_grad():
        base = -logprobs(model, h[:, :n - 1], ids[:, 1:], 1.0, cfg.loss_chunk_tokens)   # (B, n-1)
        out["base"] = base[:, positions][scored].mean()
    return out


def evaluate(model, cfg, ids, mask, pad, batch: int, steps=None, temperature: float = 0.1, seed: int = 0) -> dict:
    """policy_nll over held-out windows in batches, without grad -> floats (means weighted by the
    positions each batch scored). With `steps`, also "writes": the share of the positions whose
    context asks for a sum where the policy's own thought, sampled at `temperature` (seeded per
    batch), writes the units step (teacher.writes_step), and "positions": how many there were."""
    out: dict = {}
    total, wrote = 0, 0
    with torch.no_grad():
        for b in range(0, ids.shape[0], batch):
            x, m = ids[b:b + batch], mask[b:b + batch]
            r = policy_nll(model, cfg, x, m, pad, with_reader=True, steps=steps)
            count = r.pop("count")
            if count == 0:
                continue
            r["true"] = r.pop("loss")
            for k, v in r.items():
                out[k] = out.get(k, 0.0) + float(v) * count
            total += count
            if steps is not None:
                positions = default_positions(x.shape[1], cfg.talk_len)
                anchor = positions[None].expand(x.shape[0], -1)
                asked = sampled_where_asked(x, m, anchor, steps[0], cfg.thought_len, steps[1])
                ro = rollout(model, dataclasses.replace(cfg, temperature=temperature), x, m, positions,
                             torch.Generator().manual_seed(seed + b), thoughts=asked, partial=True)
                w, has = writes_step(ro.thoughts, x, m, anchor, (asked < 0).all(-1), steps[0])
                wrote += int(w.sum())
    if total == 0:
        raise ConfigError("the held-out windows have no position to score"
                          + (" (no sum 'a + b =' for --target steps)" if steps is not None else ""))
    out = {k: v / total for k, v in out.items()}
    if steps is not None:
        out["writes"], out["positions"] = wrote / total, total
    return out


def numbers(r: dict) -> str:
    if "writes" in r:
        return (f"at {r['positions']} held-out positions that ask for a sum, the policy's NLL of the units step "
                f"{r['true']:.3f} per thought token (first token {r['first']:.3f}); its own thought writes the step "
                f"{r['writes']:.1%} of the time; the state after the step predicts the next token at "
                f"{r['reader_first']:.3f} (base model without a thought {r['base']:.3f})")
    return (f"held-out policy NLL of the true continuation {r['true']:.3f} per token, of the next token "
            f"{r['first']:.3f}; the state after that thought predicts the next token at {r['reader_first']:.3f} "
            f"(base model without a thought {r['base']:.3f})")


def fit(model, cfg: ThoughtConfig, stream: SequenceStream, steps: int, batch: int, lr: float, pad: int,
        log=print, eot: bool = False, targets=None) -> list[float]:
    """Adam on the <sot> row of model.thought_embeds alone (everything else frozen) for `steps`
    batches of `stream`; with `eot` also the <eot> row, on the reader's NLL after the true
    continuation (added to the loss). `targets`: policy_nll's `steps` (a batch without a sum is
    skipped and not counted; 100 in a row raise ConfigError). -> the training loss of every step."""
    for p in model.parameters():
        p.requires_grad_(False)
    w = model.thought_embeds                                                          # (2, H)
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    losses, skipped = [], 0
    while len(losses) < steps:
        ids, mask = stream.next_batch(batch)
        r = policy_nll(model, cfg, ids, mask, pad, with_reader=eot, steps=targets)
        if r["count"] == 0:
            skipped += 1
            if skipped == 100:
                raise ConfigError("100 training batches in a row have no sum 'a + b =' to fit --target steps on")
            continue
        skipped = 0
        loss = r["loss"] + r["reader"] if eot else r["loss"]
        opt.zero_grad()
        loss.backward()
        if not eot:
            w.grad[1].zero_()      # only the reader term reaches <eot>: without it, Adam leaves it
        opt.step()
        losses.append(float(loss.detach()))
        what = "the units step" if targets is not None else "the true continuation"
        log(f"[fit] step {len(losses)}/{steps}: policy NLL of {what} {float(r['loss'].detach()):.3f} per token"
            + (f", reader NLL after it {float(r['reader'].detach()):.3f}" if eot else ""))
    return losses


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from qstar_ds.loading import load_model
    from qstar_ds.model import QuietStarModel
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="a base model spec (see qstar_ds.loading)")
    ap.add_argument("--data", required=True, help="a local .jsonl/.json/.parquet/.txt corpus (data.source)")
    ap.add_argument("--data_seeds", default="0", help="comma-separated data.seed of the runs that will use "
                    "the file: only documents none of them holds out are read")
    ap.add_argument("--init", default=" \u2014", help="model.thought_init to start from (and <eot>'s value)")
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--no_pack", action="store_true", help="documents' first seq_len tokens (data.pack false)")
    ap.add_argument("--thought_len", type=int, default=8)
    ap.add_argument("--talk_len", type=int, default=4)
    ap.add_argument("--eot", action="store_true", help="also fit <eot>: the reader's NLL of the talk targets "
                    "after the true continuation as the thought (added to the loss; needs the run's --talk_positions)")
    ap.add_argument("--talk_positions", default="after_thought", choices=["after_thought", "resume"],
                    help="thought.talk_positions of the runs that will use the file (where the reader sits)")
    ap.add_argument("--target", default="continuation", choices=["continuation", "steps"],
                    help="what the thought after <sot> should be: the text's next thought_len tokens at every "
                         "position, or thought.mode=teacher's units step where the context asks for a sum")
    ap.add_argument("--temperature", type=float, default=0.1,
                    help="--target steps: the temperature at which the own thoughts whose steps are counted "
                         "are sampled (the runs' eval.temperature)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4, help="windows per step")
    ap.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the <sot> vector")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows for the before/after numbers")
    ap.add_argument("--out", default="markers.safetensors")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.data_seeds.split(",")]
    except ValueError:
        print(f"fit_thought_markers: error: --data_seeds {args.data_seeds!r}: expected integers, e.g. 0,1",
              file=sys.stderr)
        return 2
    if not args.out.endswith(".safetensors"):
        print(f"fit_thought_markers: error: --out {args.out!r}: must end in .safetensors", file=sys.stderr)
        return 2
    if args.steps < 1 or args.batch < 1 or not args.lr > 0:
        print("fit_thought_markers: error: --steps and --batch must be >= 1 and --lr > 0", file=sys.stderr)
        return 2
    try:
        d = DataConfig(source=args.data, seq_len=args.seq_len, pack=not args.no_pack, seed=seeds[0])
        e = EvalConfig(sequences=args.windows)
        cfg = ThoughtConfig(n_thoughts=1, thought_len=args.thought_len, talk_len=args.talk_len,
                            talk_positions=args.talk_positions)
        if not args.temperature > 0:
            raise ConfigError(f"--temperature {args.temperature}: must be > 0")
        loaded = load_model(args.model)
        model, tok = loaded.model, loaded.tokenizer
        if not isinstance(model, QuietStarModel) or loaded.run_config is not None:
            raise ConfigError(f"--model {args.model!r}: a base model, not a trained checkpoint")
        first = tok.encode(args.init, add_special_tokens=False)
        if not first:
            raise ConfigError(f"--init {args.init!r}: the tokenizer encodes it to no tokens")
        with torch.no_grad():
            model.thought_embeds.copy_(model.base.get_input_embeddings().weight[first[0]].expand(2, -1))
        pad = tok.eos_token_id
        targets = None
        if args.target == "steps":
            try:
                check_fits(tok, args.thought_len)
            except ValueError as err:
                raise ConfigError(str(err).replace("thought.thought_len", "--thought_len")) from None
            targets = (tok, filler_token_id(tok, ThoughtConfig().filler))
        ids_h, mask_h = heldout_sequences(tok, d, e)
        stream = TrainingSideStream(tok, d.source, d.seq_len, d.pack, d.split, d.text_field, d.subset, d.seed,
                                    seeds=seeds, fraction=e.holdout_fraction)
        first_sequences(stream, 1)       # a source with no training-side document says so now
    except (ConfigError, DataError) as err:
        print(f"fit_thought_markers: error: {err}", file=sys.stderr)
        return 2
    model.eval()
    t0 = time.perf_counter()
    try:
        before = evaluate(model, cfg, ids_h, mask_h, pad, args.batch, targets, args.temperature, seeds[0])
        print(f"[fit] before ({args.init!r}): {numbers(before)}", flush=True)
        losses = fit(model, cfg, stream, args.steps, args.batch, args.lr, pad,
                     log=lambda s: print(s, file=sys.stderr, flush=True), eot=args.eot, targets=targets)
    except ConfigError as err:                        # the data has nothing to fit --target steps on
        print(f"fit_thought_markers: error: --data {args.data!r}: {err}", file=sys.stderr)
        return 2
    after = evaluate(model, cfg, ids_h, mask_h, pad, args.batch, targets, args.temperature, seeds[0])
    print(f"[fit] after {args.steps} steps: {numbers(after)}; {time.perf_counter() - t0:.0f} s", flush=True)
    meta = {"model": args.model, "data": args.data, "data_seeds": seeds, "init": args.init, "seq_len": args.seq_len,
            "pack": not args.no_pack, "thought_len": args.thought_len, "talk_len": args.talk_len,
            "talk_positions": args.talk_positions, "eot": args.eot, "target": args.target,
            "temperature": args.temperature, "steps": args.steps,
            "batch": args.batch, "lr": args.lr, "before": before, "after": after, "losses": losses}
    save_file({MARKER_KEY: model.thought_embeds.detach().float().contiguous()}, args.out,
              metadata={"qstar_ds": json.dumps(meta)})
    print(f"written {args.out} (use: --model.thought_init_file {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
