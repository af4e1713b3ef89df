"""tools/fit_thought_markers.py and model.thought_init_file: the loss it fits against the learn
pass's thought log-probs, what it changes, the documents it reads, the file it writes, and the
trainer starting from that file (bad files: one clear line)."""
import dataclasses
import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from helpers import ROOT, run_worker

sys.path.insert(0, os.path.join(ROOT, "tools"))
from fit_thought_markers import TrainingSideStream, continuation, evaluate, fit, main, policy_nll  # noqa: E402

from qstar_ds.config import ConfigError, ModelConfig, ThoughtConfig  # noqa: E402
from qstar_ds.data import DataError, SequenceStream, is_heldout  # noqa: E402
from qstar_ds.learn import learn_pass  # noqa: E402
from qstar_ds.loading import load_model  # noqa: E402
from qstar_ds.model import MARKER_KEY, read_marker_file, set_thought_embeds  # noqa: E402
from qstar_ds.rollout import default_positions  # noqa: E402
from qstar_ds.teacher import context_steps, sampled_where_asked, teacher_thoughts  # noqa: E402


@pytest.fixture()
def tiny():
    loaded = load_model("tiny-llama")
    torch.manual_seed(0)
    with torch.no_grad():          # markers unlike any token, so that a wrong row would show
        loaded.model.thought_embeds.normal_()
    return loaded


def batch(tok, B=2, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tok) - 2, (B, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1, n - 3:] = 0                                        # a short document: padding
    return ids, mask


@pytest.mark.parametrize("talk_positions", ["after_thought", "resume"])
def test_policy_nll_is_the_learn_pass_thought_nll_of_the_true_continuation(tiny, talk_positions):
    model, tok = tiny.model, tiny.tokenizer
    cfg = ThoughtConfig(n_thoughts=1, thought_len=3, talk_len=2, temperature=0.3,   # the fit scores at T 1
                        talk_positions=talk_positions)
    ids, mask = batch(tok)
    pad = tok.eos_token_id
    got = policy_nll(model, cfg, ids, mask, pad, with_reader=True)
    positions = default_positions(ids.shape[1], cfg.talk_len)
    thoughts, real = continuation(ids, mask, positions, cfg.thought_len, pad)      # (B, P, t)
    for b in range(ids.shape[0]):
        for j, p in enumerate(positions.tolist()):
            want = [int(ids[b, q]) if q < ids.shape[1] and mask[b, q] else pad for q in range(p + 1, p + 4)]
            assert thoughts[b, j].tolist() == want
    real = real & mask.bool()[:, positions, None]
    anchor = positions[None].expand(ids.shape[0], -1).contiguous()
    ref_cfg = ThoughtConfig(n_thoughts=1, thought_len=3, talk_len=2, temperature=1.0, w_read=0.1,
                            talk_positions=talk_positions)
    with torch.no_grad():
        ref = learn_pass(model, ref_cfg, ids, mask, anchor, thoughts)
    nll = -ref.thought_logp.double()
    want = (nll * real).sum() / real.sum()
    assert float(got["loss"].detach()) == pytest.approx(float(want), rel=1e-5)
    first = real[..., 0]
    assert float(got["first"]) == pytest.approx(float(nll[..., 0][first].mean()), rel=1e-5)
    base = -ref.base_logp.double()[:, positions][first].mean()
    assert float(got["base"]) == pytest.approx(float(base), rel=1e-5)
    read = -ref.read_logp.double()                                                 # (B, P, K)
    assert float(got["reader"].detach()) == pytest.approx(float(read[ref.valid].mean()), rel=1e-5)
    assert float(got["reader_first"]) == pytest.approx(float(read[..., 0][ref.valid].mean()), rel=1e-5)


def fits_only_the_markers_and_lowers_the_loss(model, tok, cfg, stream, ids, mask, steps, lr, eot, targets=None):
    """fit() for `steps` batches of `stream`: the loss (and with `eot` the reader's) on (ids, mask)
    falls, <sot> moves, <eot> only with `eot`, nothing else."""
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    def loss():
        with torch.no_grad():
            r = policy_nll(model, cfg, ids, mask, tok.eos_token_id, with_reader=True, steps=targets)
        return float(r["loss"]), float(r["reader"])

    before = loss()
    losses = fit(model, cfg, stream, steps=steps, batch=2, lr=lr, pad=tok.eos_token_id, log=lambda s: None,
                 eot=eot, targets=targets)
    after = loss()
    assert len(losses) == steps and after[0] < before[0] - 0.05, (before, after)
    if eot:
        assert after[1] < before[1] - 0.05, (before, after)
    for n, p in model.named_parameters():
        if n == "thought_embedding.weight":
            assert not torch.equal(p[0], before_params[n][0]), "<sot> must move"
            assert torch.equal(p[1], before_params[n][1]) != eot, "<eot> moves only with eot"
        else:
            assert torch.equal(p, before_params[n]), f"{n} must stay frozen"


@pytest.mark.parametrize("eot", [False, True])
def test_fit_moves_only_the_markers_it_fits_and_lowers_the_loss(tiny, tmp_path, eot):
    model, tok = tiny.model, tiny.tokenizer
    cfg = ThoughtConfig(n_thoughts=1, thought_len=3, talk_len=2)
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": "one two three four five six seven eight nine ten. " * 3}) + "\n"
                           for _ in range(40)))
    ids, mask = SequenceStream(tok, str(src), 16).next_batch(2)
    fits_only_the_markers_and_lowers_the_loss(model, tok, cfg, SequenceStream(tok, str(src), 16), ids, mask,
                                              15, 0.05, eot)

def sums(tok, k=4, n=40, seed=0):
    """(k, n) ids and mask of documents with two-number sums (the last one shorter: padding)."""
    g = torch.Generator().manual_seed(seed)
    docs = [f"Compute {a} + {b}. We have {a} + {b} = {a + b}. Then {b} + {a} = {a + b} again."
            for a, b in torch.randint(2, 99, (k, 2), generator=g).tolist()]
    rows = [tok(d, add_special_tokens=False).input_ids[:n - 3 * (j == k - 1)] for j, d in enumerate(docs)]
    ids = torch.tensor([r + [tok.eos_token_id] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    return ids, mask


def test_policy_nll_on_steps_is_the_learn_pass_thought_nll_of_the_teacher_thoughts(tiny):
    """--target steps: the thought at a position whose context asks for a sum is the teacher's
    (units step + filler, all t tokens targets); only those positions are scored."""
    model, tok = tiny.model, tiny.tokenizer
    cfg = ThoughtConfig(n_thoughts=1, thought_len=6, talk_len=2)
    ids, mask = sums(tok)
    fill = tok.encode("...", add_special_tokens=False)[0]
    got = policy_nll(model, cfg, ids, mask, tok.eos_token_id, with_reader=True, steps=(tok, fill))
    positions = default_positions(ids.shape[1], cfg.talk_len)
    anchor = positions[None].expand(ids.shape[0], -1).contiguous()
    thoughts, on = teacher_thoughts(ids, mask, anchor, tok, 6, fill)
    assert on.sum() >= 12 and (~on).sum() > 0
    with torch.no_grad():
        ref = learn_pass(model, ThoughtConfig(n_thoughts=1, thought_len=6, talk_len=2, temperature=1.0, w_read=0.1),
                         ids, mask, anchor, thoughts)
    nll = -ref.thought_logp.double()                                                # (B, P, t)
    assert got["count"] == int(on.sum())
    assert float(got["loss"].detach()) == pytest.approx(float(nll[on].mean()), rel=1e-5)
    assert float(got["first"]) == pytest.approx(float(nll[..., 0][on].mean()), rel=1e-5)
    assert float(got["base"]) == pytest.approx(float(-ref.base_logp.double()[:, positions][on].mean()), rel=1e-5)
    read = -ref.read_logp.double()
    assert float(got["reader"].detach()) == pytest.approx(float(read[ref.valid & on].mean()), rel=1e-5)
    plain = torch.randint(5, 30, ids.shape, generator=torch.Generator().manual_seed(1))   # no "+" anywhere
    none = policy_nll(model, cfg, plain, mask, tok.eos_token_id, steps=(tok, fill))
    assert none["count"] == 0 and torch.isnan(none["loss"])


def test_evaluate_counts_the_own_thoughts_that_write_the_step(tiny):
    """evaluate(steps=...)["writes"]: the own thought sampled where the context asks for a sum
    (seed + the batch's first index), against nll_scores' thoughts and a decode loop."""
    from qstar_ds.evaluate import nll_scores
    model, tok = tiny.model, tiny.tokenizer
    cfg = ThoughtConfig(n_thoughts=1, thought_len=6, talk_len=2)
    ids, mask = sums(tok, k=6, seed=3)
    fill = tok.encode("...", add_special_tokens=False)[0]
    steps = (tok, fill)
    # a fitted-looking policy: the step's first tokens get most of the mass for some sums
    got = evaluate(model, cfg, ids, mask, tok.eos_token_id, 4, steps, temperature=1.0, seed=7)
    positions = default_positions(ids.shape[1], cfg.talk_len)
    anchor = positions[None].expand(ids.shape[0], -1)
    asked = sampled_where_asked(ids, mask, anchor, tok, 6, fill)
    own = nll_scores(model, dataclasses.replace(cfg, temperature=1.0), ids, mask, 4, 7, thoughts=asked, partial=True)
    hits, total = 0, 0
    for d in range(ids.shape[0]):
        want = context_steps(ids[d].tolist(), mask[d].bool().tolist(), tok)
        for p, i in enumerate(anchor[d].tolist()):
            if want[i] is not None:
                total += 1
                hits += tok.decode(own["thoughts"][d, p].tolist()).replace(" ", "").startswith(want[i])
    assert got["positions"] == total > 0 and got["writes"] == pytest.approx(hits / total)
    # the count itself: a policy that writes every step (the teacher's thought fed where it
    # samples) scores 1, one that writes another sum's step 0
    import fit_thought_markers
    real = fit_thought_markers.rollout

    def feeding(shift):
        def ro(model, cfg, x, m, positions, gen, thoughts=None, partial=False):
            anc = positions[None].expand(x.shape[0], -1)
            th, on = teacher_thoughts(x.roll(shift, 0), m.roll(shift, 0), anc, tok, 6, fill)
            ok = on & on.roll(-shift, 0) if shift else on
            return real(model, cfg, x, m, positions, gen, thoughts=torch.where(ok[..., None], th, fill))
        return ro
    for shift, want in ((0, 1.0), (1, 0.0)):
        fit_thought_markers.rollout = feeding(shift)
        try:
            r = evaluate(model, cfg, ids, mask, tok.eos_token_id, 6, steps, temperature=1.0, seed=7)
        finally:
            fit_thought_markers.rollout = real
        assert r["writes"] == want and r["positions"] == total


@pytest.mark.parametrize("eot", [False, True])
def test_fit_on_steps_lowers_the_step_nll_and_moves_only_the_markers(tiny, tmp_path, eot):
    model, tok = tiny.model, tiny.tokenizer
    cfg = ThoughtConfig(n_thoughts=1, thought_len=6, talk_len=2)
    src = tmp_path / "c.jsonl"
    g = torch.Generator().manual_seed(5)
    src.write_text("".join(json.dumps({"text": f"We have {a} + {b} = {a + b}. "}) + "\n"
                           for a, b in torch.randint(2, 99, (200, 2), generator=g).tolist()))
    fill = tok.encode("...", add_special_tokens=False)[0]
    ids, mask = sums(tok, seed=9)
    fits_only_the_markers_and_lowers_the_loss(model, tok, cfg, SequenceStream(tok, str(src), 24), ids, mask,
                                              30, 0.3, eot, targets=(tok, fill))

def test_training_side_stream_skips_documents_any_seed_holds_out(tiny, tmp_path):
    tok = tiny.tokenizer
    docs = [f"document number {k} says {k * 7 % 13}" for k in range(120)]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    s = TrainingSideStream(tok, str(src), 32, pack=False, seeds=[0, 1], fraction=0.2)
    read = []
    try:
        while True:
            ids, mask = s.next_sequence()
            read.append(tok.decode([i for i, m in zip(ids, mask) if m]))
    except DataError:              # the source ran out
        pass
    want = [d for d in docs if not is_heldout(d, 0.2, 0) and not is_heldout(d, 0.2, 1)]
    held = [d for d in docs if is_heldout(d, 0.2, 0) or is_heldout(d, 0.2, 1)]
    assert held and any(is_heldout(d, 0.2, 1) and not is_heldout(d, 0.2, 0) for d in docs), "seed 1 must matter"
    assert [r.strip() for r in read] == want


def test_cli_writes_a_file_the_trainer_starts_from(tiny, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"line {k}: the sum of {k} and {k + 1} is {2 * k + 1}."}) + "\n"
                           for k in range(300)))
    out = tmp_path / "m.safetensors"
    assert main(["--model", "tiny-llama", "--data", str(src), "--data_seeds", "0,1", "--seq_len", "16",
                 "--thought_len", "3", "--talk_len", "2", "--steps", "2", "--batch", "2", "--windows", "2",
                 "--out", str(out)]) == 0
    w = read_marker_file(str(out))
    emb = tiny.model.base.get_input_embeddings().weight
    first = tiny.tokenizer.encode(" \u2014", add_special_tokens=False)[0]
    assert w.shape == (2, emb.shape[1])
    assert torch.equal(w[1], emb[first].float()), "<eot> keeps the init text's embedding"
    assert not torch.equal(w[0], emb[first].float()), "<sot> is fitted"
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["qstar_ds"])
    assert meta["data_seeds"] == [0, 1] and meta["steps"] == 2 and len(meta["losses"]) == 2
    assert set(meta["before"]) == {"true", "first", "reader", "reader_first", "base"} and meta["eot"] is False
    assert main(["--model", "tiny-llama", "--data", str(src), "--out", str(tmp_path / "m.pt")]) == 2
    assert main(["--model", "tiny-llama", "--data", str(src), "--data_seeds", "a", "--out", str(out)]) == 2
    # the trainer (one rank, ZeRO-3) starts both markers from the file
    two = run_worker(tmp_path, "from_file", 1, {"model.thought_init_file": str(out), "train.max_steps": 1})
    assert torch.equal(two["init"]["thought_embedding.weight"], w)


def test_cli_target_steps_reports_how_often_the_step_is_written(tiny, tmp_path, capsys):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"We have {k} + {k + 7} = {2 * k + 7}. Next."}) + "\n"
                           for k in range(300)))
    out = tmp_path / "m.safetensors"
    args = ["--model", "tiny-llama", "--data", str(src), "--seq_len", "24", "--thought_len", "6", "--talk_len", "2",
            "--steps", "2", "--batch", "2", "--windows", "3", "--target", "steps", "--init=---"]
    assert main(args + ["--out", str(out)]) == 0
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["qstar_ds"])
    assert meta["target"] == "steps" and meta["temperature"] == 0.1 and meta["init"] == "---"
    assert {"writes", "positions", "true", "first", "reader", "base"} <= set(meta["after"])
    assert meta["after"]["positions"] > 0 and 0 <= meta["after"]["writes"] <= 1
    assert "own thought writes the step" in capsys.readouterr().out
    capsys.readouterr()
    assert main(args + ["--thought_len", "3", "--out", str(out)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("fit_thought_markers")]
    assert len(err) == 1 and "--thought_len=3" in err[0], err
    plain = tmp_path / "p.jsonl"
    plain.write_text("".join(json.dumps({"text": f"line {k} has no sum, only {k} - 1."}) + "\n" for k in range(300)))
    assert main(["--model", "tiny-llama", "--data", str(plain), "--seq_len", "16", "--thought_len", "6",
                 "--talk_len", "2", "--target", "steps", "--out", str(out)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("fit_thought_markers")]
    assert len(err) == 1 and "no sum" in err[0] and str(plain) in err[0], err


def test_bad_marker_files_are_one_clear_line(tiny, tmp_path):
    H = tiny.model.base.config.hidden_size
    with pytest.raises(ConfigError, match="must be a .safetensors file"):
        ModelConfig(thought_init_file="m.pt")
    cases = {"missing": (None, "no such file"),
             "garbage": (b"not a safetensors file at all", "not a readable .safetensors file"),
             "key": ({"other": torch.zeros(2, H)}, "found no such tensor"),
             "shape": ({MARKER_KEY: torch.zeros(3, H)}, "found shape (3, %d)" % H),
             "ints": ({MARKER_KEY: torch.zeros(2, H, dtype=torch.long)}, "torch.int64"),
             "nan": ({MARKER_KEY: torch.full((2, H), float("nan"))}, "non-finite")}
    for name, (content, needle) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            save_file(content, str(path))
        with pytest.raises(ConfigError) as e:
            read_marker_file(str(path))
        msg = str(e.value)
        assert msg.startswith(f"model.thought_init_file={str(path)!r}") and needle in msg and "\n" not in msg, msg
    path = tmp_path / "wide.safetensors"
    save_file({MARKER_KEY: torch.zeros(2, H + 1)}, str(path))
    with pytest.raises(ConfigError, match=rf"is \(2, {H + 1}\), this model needs \(2, {H}\)"):
        set_thought_embeds(tiny.model, read_marker_file(str(path)), str(path))
