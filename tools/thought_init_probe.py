"""Before a run: what the thought markers' starting embedding makes the untrained model think.

    python tools/thought_init_probe.py --data ../shared/data/owm_sample/text.jsonl --init "---" --init " —"

For each init text (its first token's embedding starts <|startofthought|> and <|endofthought|>, as
model.thought_init does; or each --init_file, as model.thought_init_file does), on the held-out
windows a run with these data settings scores (data.seed 0, packed unless --no_pack): one thought
sampled at --temperature after every position whose K-token window fits, and

  newline   the share of thoughts whose first token starts with a newline: a new paragraph
            rather than the text going on
  reader    NLL of the next token from the post-thought state alone (w = 1, what a model reads
            from a thought; the mixing head is untrained, so the mixed prediction is still the
            base one), with the window's own thought, with the thought sampled at the same position
            of the previous window ("other"), and with the true next thought_len tokens as the
            thought ("true"; EOS-padded where the window ends first)
  content   reader other - own, 95% CI over windows: > 0 when the thought's content helps the
            reader, the effect the content check of a trained run looks for
  policy    how likely the thought policy (temperature 1) is to think the true continuation:
            NLL of x_{i+1} as the thought's first token (compare the base NLL) and per token of
            the true next thought_len tokens (those inside the window); and the share of the
            window's own thoughts that start with x_{i+1} ("hit"): what REINFORCE must raise
            before a reader that copies could gain from a thought

All on the same positions and windows; prints one line per init and writes JSON (--out), with
each number's per-window values. `--compare A.json B.json` reads two such files over the same
windows (e.g. two checkpoints probed with the same --data_seed) and prints B - A for every number
with a paired 95% CI over windows.
--keep_markers instead probes the model as loaded, e.g. a trained checkpoint
(`--model RUN/checkpoints/step_00000030 --keep_markers --data_seed S`, S the run's data.seed, so
that its windows are ones the run never trained on): has training taught the state after a
thought to use what the thought says?
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qstar_ds.config import ConfigError, DataConfig, EvalConfig, ThoughtConfig  # noqa: E402
from qstar_ds.heldout import mean_ci, per_sequence  # noqa: E402
from qstar_ds.model import read_marker_file, set_thought_embeds  # noqa: E402
from qstar_ds.rollout import default_positions, rollout  # noqa: E402


def true_thoughts(ids: torch.Tensor, positions: torch.Tensor, t: int, pad: int) -> torch.Tensor:
    """(D, n) ids, (P,) positions -> (D, P, t): x_{i+1..i+t} after each position i, `pad` past the end."""
    padded = torch.nn.functional.pad(ids, (0, t), value=pad)                     # (D, n + t)
    idx = positions[:, None] + 1 + torch.arange(t)                               # (P, t)
    return padded[:, idx]


def set_markers(model, tokenizer, text: str) -> int:
    """Both thought markers <- the input embedding of the first token of `text`; -> that token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ConfigError(f"--init {text!r}: the tokenizer encodes it to no tokens")
    with torch.no_grad():
        model.thought_embeds.copy_(model.base.get_input_embeddings().weight[ids[0]].expand(2, -1))
    return ids[0]


def probe(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor, cfg: ThoughtConfig, seed: int) -> dict:
    """One init (already set): thoughts and the reader's next-token log-probs with own, another
    window's and the true thoughts. -> summary numbers plus the three thought tensors (D, P, t)."""
    positions = default_positions(ids.shape[1], cfg.talk_len, ids.device)
    own = rollout(model, cfg, ids, mask, positions, torch.Generator().manual_seed(seed), base_logprobs=True,
                  read_logprobs_too=True)
    fed = {"other": own.thoughts.roll(1, dims=0),
           "true": true_thoughts(ids, positions, cfg.thought_len, tokenizer.eos_token_id)}
    ros = {"own": own, **{k: rollout(model, cfg, ids, mask, positions, thoughts=v, read_logprobs_too=True,
                                     thought_logprobs_too=k == "true") for k, v in fed.items()}}
    valid = own.valid.bool()                                                     # (D, P)
    base = own.base_logp.gather(1, own.anchor)                                   # (D, P)
    tok_ok = true_thoughts(mask, positions, cfg.thought_len, 0).bool() & valid[..., None]  # (D, P, t) real tokens
    pol = -ros["true"].thought_logp.double()                                     # (D, P, t)
    windows = {"nll_base": per_sequence(-base.double(), valid),                  # each (D,): one mean per window
               **{f"nll_reader_{k}": per_sequence(-ro.read_logp[..., 0].double(), valid) for k, ro in ros.items()},
               "policy_first": per_sequence(pol[..., 0], valid),
               "policy_true": per_sequence(pol.flatten(1), tok_ok.flatten(1)),
               "hit_first": per_sequence((own.thoughts[..., 0] == fed["true"][..., 0]).double(), valid)}
    out: dict = {"windows": int(ids.shape[0]), "positions": int(valid.sum()),
                 **{k: mean_ci(v)[0] for k, v in windows.items()}}
    diff = (ros["own"].read_logp - ros["other"].read_logp)[..., 0].double()
    m, lo, hi = mean_ci(per_sequence(diff, valid))
    out["content"], out["content_ci95"] = m, [lo, hi]
    out["per_window"] = {k: v.tolist() for k, v in windows.items()}
    firsts = own.thoughts[..., 0][valid].tolist()
    out["newline"] = sum(tokenizer.decode([f]).startswith("\n") for f in firsts) / max(1, len(firsts))
    out["examples"] = [{"context": tokenizer.decode(ids[0, max(0, p - 8):p + 1].tolist()),
                        "thought": tokenizer.decode(own.thoughts[0, p].tolist())}
                       for p in range(0, int(valid[0].sum()), max(1, int(valid[0].sum()) // 3))][:3]
    return {**out, "thoughts": {"own": own.thoughts, **fed}}


SAME_WINDOWS = ("data", "windows", "seq_len", "no_pack", "data_seed", "thought_len", "talk_len")


def compare(path_a: str, path_b: str) -> list[str]:
    """Two probe files over the same windows -> lines: each per-window number of A and B and B - A
    with its 95% CI over windows (paired: the windows are the same). Raises ConfigError."""
    def load(path):
        try:
            with open(path) as f:
                d = json.load(f)
            return d["settings"], d["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--compare {path}: not a thought_init_probe output ({type(e).__name__}: {e})")
    (sa, ra), (sb, rb) = load(path_a), load(path_b)
    for k in SAME_WINDOWS:
        if sa.get(k) != sb.get(k):
            raise ConfigError(f"--compare: {k} differs ({sa.get(k)!r} in {path_a}, {sb.get(k)!r} in {path_b}): "
                              "not the same windows")
    if len(ra) != len(rb):
        raise ConfigError(f"--compare: {path_a} has {len(ra)} results, {path_b} {len(rb)}")
    lines = [f"B - A over {sa['windows']} windows (data_seed {sa['data_seed']}), 95% CI; A = {path_a}, B = {path_b}"]
    for x, y in zip(ra, rb):
        for path, r in ((path_a, x), (path_b, y)):
            if "per_window" not in r:
                raise ConfigError(f"--compare {path}: no per-window numbers (written before they were kept); "
                                  "probe again")
        lines.append(f"  A init {x['init']!r}, B init {y['init']!r}:")
        for k, va in x["per_window"].items():
            vb = y["per_window"].get(k)
            if vb is None or len(vb) != len(va):
                raise ConfigError(f"--compare: {k} has {len(va)} windows in {path_a}, "
                                  f"{'none' if vb is None else len(vb)} in {path_b}")
            m, lo, hi = mean_ci(torch.tensor(vb, dtype=torch.float64) - torch.tensor(va, dtype=torch.float64))
            lines.append(f"    {k:<18} A {x[k]:.4f}  B {y[k]:.4f}  B - A {m:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    return lines


def main(argv: list[str] | None = None) -> int:
    from qstar_ds.data import DataError, heldout_sequences
    from qstar_ds.loading import load_model
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="a base model spec (see qstar_ds.loading)")
    ap.add_argument("--data", help="a local .jsonl/.json/.parquet/.txt corpus (data.source); required unless --compare")
    ap.add_argument("--init", action="append", help="a text to start the markers from (repeatable; "
                    "default: --init --- --init ' \u2014')")
    ap.add_argument("--windows", type=int, default=12, help="held-out windows (eval.sequences)")
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--no_pack", action="store_true", help="documents' first seq_len tokens (data.pack false)")
    ap.add_argument("--thought_len", type=int, default=8)
    ap.add_argument("--talk_len", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--talk_positions", default=None, choices=["after_thought", "resume"],
                    help="thought.talk_positions (default: the model's training value, after_thought for a base model)")
    ap.add_argument("--init_file", action="append", default=[],
                    help="a model.thought_init_file (.safetensors, e.g. from tools/fit_thought_markers.py) to "
                    "start the markers from (repeatable; probed after the --init texts)")
    ap.add_argument("--keep_markers", action="store_true", help="probe the markers as loaded (a trained model)")
    ap.add_argument("--data_seed", type=int, default=0, help="data.seed: which documents are held out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="thought_init_probe.json")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                    help="probe nothing: compare two outputs over the same windows (B - A, paired 95%% CIs)")
    argv, joined = list(sys.argv[1:] if argv is None else argv), []
    while argv:                                 # "--init ---": a value that starts with "-"
        a = argv.pop(0)
        joined.append(f"--init={argv.pop(0)}" if a == "--init" and argv else a)
    args = ap.parse_args(joined)
    if args.compare:
        try:
            print("\n".join(compare(*args.compare)))
        except ConfigError as e:
            print(f"thought_init_probe: error: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.data:
        ap.error("--data is required (unless --compare)")
    if args.keep_markers and (args.init or args.init_file):
        ap.error("--keep_markers probes the markers as loaded; drop --init and --init_file")
    if args.keep_markers:
        args.init = [None]
    elif not args.init_file:
        args.init = args.init or ["---", " \u2014"]
    starts = [(text, None) for text in args.init or []] + [(None, path) for path in args.init_file]
    try:
        d = DataConfig(source=args.data, seq_len=args.seq_len, pack=not args.no_pack, seed=args.data_seed)
        loaded = load_model(args.model)
        cfg = ThoughtConfig(n_thoughts=1, temperature=args.temperature, thought_len=args.thought_len,
                            talk_len=args.talk_len, talk_positions=args.talk_positions or loaded.talk_positions)
        tok = loaded.tokenizer
        for text in args.init or []:
            if text is not None and not tok.encode(text, add_special_tokens=False):
                raise ConfigError(f"--init {text!r}: the tokenizer encodes it to no tokens")
        files = {path: read_marker_file(path) for path in args.init_file}
        for path, w in files.items():
            set_thought_embeds(loaded.model, w, path)      # checks the shape now, before the probing
        ids, mask = heldout_sequences(tok, d, EvalConfig(sequences=args.windows))
    except (ConfigError, DataError) as e:
        print(f"thought_init_probe: error: {e}", file=sys.stderr)
        return 2
    if ids.shape[0] < 2:
        print(f"thought_init_probe: error: --data {args.data} gives {ids.shape[0]} held-out window(s); "
              "the content check needs 2", file=sys.stderr)
        return 2
    results = []
    for text, path in starts:
        first = None
        if path is not None:
            set_thought_embeds(loaded.model, files[path], path)
        elif text is not None:
            first = set_markers(loaded.model, tok, text)
        label = f"file {path}" if path is not None else "markers as loaded" if text is None else repr(text)
        t0 = time.perf_counter()
        print(f"[probe] {label}: {ids.shape[0]} windows x 3 rollouts ...", file=sys.stderr, flush=True)
        r = probe(loaded.model, tok, ids, mask, cfg, args.seed)
        r.pop("thoughts")
        r.update(init=text if path is None else f"file:{path}", token=None if first is None else tok.decode([first]),
                 seconds=time.perf_counter() - t0)
        results.append(r)
        lo, hi = r["content_ci95"]
        what = (f"markers from {path}" if path is not None else f"markers as loaded ({loaded.source})"
                if text is None else f"init {text!r} (token {r['token']!r})")
        print(f"{what}: thoughts opening with a newline {r['newline']:.2f}; "
              f"next-token NLL base {r['nll_base']:.3f}, reader with its own thought {r['nll_reader_own']:.3f}, "
              f"another window's {r['nll_reader_other']:.3f}, the true continuation {r['nll_reader_true']:.3f}; "
              f"content {r['content']:+.3f} (95% CI {lo:+.3f}..{hi:+.3f}); policy NLL of the true continuation: "
              f"first token {r['policy_first']:.3f}, per token {r['policy_true']:.3f}; own thoughts starting "
              f"with the true next token {r['hit_first']:.3f} ({r['seconds']:.0f} s)", flush=True)
        for ex in r["examples"]:
            print(f"    {ex['context']!r} -> {ex['thought']!r}")
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "data": args.data, "settings": {**vars(args), "talk_positions": cfg.talk_positions},
                   "results": results}, f, indent=1)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
