"""Held-out evaluation (qstar_ds/heldout.py): its numbers against the learn pass and against a
brute-force computation, the data split it relies on, and the nll task of qstar_ds.evaluate."""
import math

import pytest
import torch

from qstar_ds.config import ThoughtConfig
from qstar_ds.data import SequenceStream, is_heldout
from qstar_ds.heldout import (flat_metrics, focus_positions, focus_summary, mixture, read_mix, sequence_nll, summarize,
                              token_focus, token_scores)
from qstar_ds.learn import learn_pass
from qstar_ds.rollout import default_positions, rollout
from qstar_ds.tiny import tiny_tokenizer

from conftest import gen, make_model, random_batch
from helpers import assert_equal


def scores(model, cfg, x, am, seed=0):
    pos = default_positions(x.shape[1], cfg.talk_len, x.device)
    ro = rollout(model, cfg, x, am, pos, gen(seed), base_logprobs=True)
    return ro, token_scores(ro.base_logp, ro.talk_logp, ro.anchor, ro.valid, ro.mix_w)


@pytest.mark.parametrize("talk_len", [1, 3])
def test_eval_scores_equal_the_learn_pass_on_the_same_thoughts(talk_len):
    """mixed (K = 1) and the K-token window equal the learn pass's talk log-probs for the same
    thoughts, base equals its base log-probs, on every valid position (padded batch)."""
    model, tok = make_model("llama")
    cfg = ThoughtConfig(thought_len=3, n_thoughts=1, talk_len=talk_len, temperature=0.7)
    x, am = random_batch(14, 2, len(tok) - 2, "both", seed=3)
    ro, s = scores(model, cfg, x, am)
    with torch.no_grad():
        out = learn_pass(model, cfg, x, am, ro.anchor, ro.thoughts)
    v = s["valid"]
    assert v.sum() > 10
    torch.testing.assert_close(s["mixed"][v], out.talk_logp[..., 0][v].double(), rtol=0, atol=1e-10)
    torch.testing.assert_close(s["mixed_win"][v], out.talk_logp.sum(-1)[v].double(), rtol=0, atol=1e-10)
    # base: log p(x_{i+1}) from the learn pass's base NLL at the anchor, masked targets excluded
    base_at = out.base_logp.gather(1, ro.anchor)
    torch.testing.assert_close(s["base"][v], base_at[v].double(), rtol=0, atol=1e-10)
    assert (s["mixed"][v] - s["base"][v]).abs().max() > 1e-4, "a random mixing head must change predictions"


def test_untrained_mixing_head_gives_exactly_zero_gain():
    model, tok = make_model("llama", randomize=False)          # last mixing layer zero: w = 0
    cfg = ThoughtConfig(thought_len=2, n_thoughts=1, talk_len=2, temperature=1.0)
    x, am = random_batch(12, 3, len(tok) - 2, "right", seed=5)
    _, s = scores(model, cfg, x, am)
    v = s["valid"]
    assert float((s["mixed"] - s["base"])[v].abs().max()) <= 1e-12
    m = summarize(s, cfg.talk_len)
    assert abs(m["gain"]) <= 1e-12 and abs(m["gain_win"]) <= 1e-12 and m["mix_w"] == 0.0


def test_untrained_probability_mixing_head_is_the_fixed_read_mix():
    """model.mix_rule=prob with the head's last layer at zero: every weight is mix_init, and the
    mixed prediction equals heldout.read_mix(mix_init) of the same thoughts' read log-probs."""
    model, tok = make_model("llama", randomize=False)
    model.set_mix_rule("prob", 0.15)
    cfg = ThoughtConfig(thought_len=2, n_thoughts=1, talk_len=2, temperature=1.0, w_read=1.0)
    x, am = random_batch(12, 3, len(tok) - 2, "right", seed=5)
    ro, s = scores(model, cfg, x, am)
    with torch.no_grad():
        out = learn_pass(model, cfg, x, am, ro.anchor, ro.thoughts)
    v = s["valid"]
    torch.testing.assert_close(s["w"][v], torch.full_like(s["w"][v], 0.15), rtol=0, atol=1e-12)
    fixed = read_mix({**s, "read": out.read_logp[..., 0].double()}, 0.15)
    torch.testing.assert_close(s["mixed"][v], fixed[v], rtol=0, atol=1e-10)
    assert (s["mixed"] - s["base"])[v].abs().max() > 1e-3


def test_read_mix_is_a_mixture_of_the_two_distributions():
    """read_mix(w): log((1 - w) p_base + w p_read) token by token, by hand; w = 1 is the read
    state alone; a wrong thought (p_read ~ 0) costs exactly -log(1 - w); heldout.mixture of two
    draws averages p_read as well, and read_mix of the mixture is the mean of the draws' mixtures."""
    g = torch.Generator().manual_seed(2)
    base = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 4
    read = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 8
    s = {"base": base, "read": read, "valid": torch.ones(3, 5, dtype=torch.bool)}
    for w in (0.05, 0.3):
        got = read_mix(s, w)
        for d in range(3):
            for p in range(5):
                want = math.log((1 - w) * math.exp(float(base[d, p])) + w * math.exp(float(read[d, p])))
                assert float(got[d, p]) == pytest.approx(want, rel=1e-12)
    assert torch.equal(read_mix(s, 1.0), read)
    wrong = {**s, "read": torch.full_like(read, -1e4)}
    torch.testing.assert_close(read_mix(wrong, 0.1), base + math.log(0.9), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="must be in"):
        read_mix(s, 0.0)
    other = {**s, "read": read - 1.0, "mixed": base, "mixed_win": base, "w": base}
    both = mixture([{**s, "mixed": base, "mixed_win": base, "w": base}, other])
    want = torch.log((read_mix(s, 0.2).exp() + read_mix(other, 0.2).exp()) / 2)
    torch.testing.assert_close(read_mix(both, 0.2), want, rtol=0, atol=1e-12)


def test_summarize_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    D, P, K = 7, 30, 3
    base = -torch.rand(D, P, generator=g, dtype=torch.float64) * 5
    mixed = base + torch.randn(D, P, generator=g, dtype=torch.float64) * 0.1 + 0.02
    valid = torch.rand(D, P, generator=g) > 0.2
    valid[3] = False                                  # a sequence without a scored token is dropped
    s = {"base": base, "mixed": mixed, "base_win": base * K, "mixed_win": mixed * K,
         "w": torch.full((D, P), 0.5, dtype=torch.float64), "valid": valid}
    m = summarize(s, K)
    # per sequence means, then mean and normal CI over sequences
    per = [float((mixed[d] - base[d])[valid[d]].mean()) for d in range(D) if valid[d].any()]
    mu = sum(per) / len(per)
    sd = math.sqrt(sum((p - mu) ** 2 for p in per) / (len(per) - 1))
    assert m["sequences"] == 6 and m["tokens"] == int(valid.sum())
    assert m["gain"] == pytest.approx(mu, abs=1e-12)
    assert m["gain_ci95"] == pytest.approx([mu - 1.96 * sd / math.sqrt(6), mu + 1.96 * sd / math.sqrt(6)], abs=1e-12)
    assert m["gain_win"] == pytest.approx(mu, abs=1e-12)                # window sums / K
    assert m["nll_base"] == pytest.approx(sum(float(-base[d][valid[d]].mean()) for d in range(D)
                                              if valid[d].any()) / 6, abs=1e-12)
    # deciles: sort every scored token by base NLL, cut into 10 equal groups
    nll, gain = (-base)[valid], (mixed - base)[valid]
    order = torch.argsort(nll)
    groups = torch.tensor_split(order, 10)
    for d, idx in enumerate(groups):
        assert m["gain_by_decile"][d] == pytest.approx(float(gain[idx].mean()), abs=1e-12), d
    assert m["gain_hard10"] == pytest.approx(float(gain[groups[-1]].mean()), abs=1e-12)
    flat = flat_metrics(m)
    assert flat["eval/gain_by_decile_9"] == m["gain_by_decile"][9]
    assert flat["eval/gain_lo"] == m["gain_ci95"][0]
    seq = sequence_nll(s, True)
    assert float(seq[0]) == pytest.approx(float(-mixed[0][valid[0]].mean()))
    # each sequence's first scored position apart from the rest
    firsts = [int(valid[d].nonzero()[0]) for d in range(D) if valid[d].any()]
    rows = [d for d in range(D) if valid[d].any()]
    g_first = [float(mixed[d, p] - base[d, p]) for d, p in zip(rows, firsts)]
    assert m["gain_first"] == pytest.approx(sum(g_first) / len(g_first), abs=1e-12)
    rest = [float((mixed[d] - base[d])[valid[d]][1:].mean()) for d in rows]
    assert m["gain_rest"] == pytest.approx(sum(rest) / len(rest), abs=1e-12)
    assert m["gain_rest"] != pytest.approx(m["gain"], abs=1e-6)
    seq_rest = sequence_nll(s, True, skip_first=True)
    assert float(seq_rest[0]) == pytest.approx(float(-mixed[0][valid[0]][1:].mean()))


def test_token_focus_marks_the_tokens_that_overlap_a_match():
    """token_focus: a token is in focus when its text (what it adds to the decoded prefix) overlaps
    a match; checked against the tokenizer's own character offsets of each token in the original
    text, with a multi-byte character split over two tokens (the one that completes it owns it)
    and a pattern that matches nothing."""
    import re
    tok = tiny_tokenizer()
    texts = ["We have 47 + 38 = 85. Then 12 * 3 = 36, so x = 7.", "caf\u00e9 = 9 and \u00fcber = 10 or y=4"]
    enc = [tok(t, return_offsets_mapping=True) for t in texts]
    rows = [e["input_ids"][:21] for e in enc]
    got = token_focus(torch.tensor(rows), tok, r"(?<== )\d+")
    for d, (t, e) in enumerate(zip(texts, enc)):
        inside = {c for m in re.finditer(r"(?<== )\d+", t) for c in range(m.start(), m.end())}
        spans = e["offset_mapping"][:21]
        for j, (a, b) in enumerate(spans):
            shared = [k for k, sp in enumerate(spans) if sp == (a, b)]
            want = any(c in inside for c in range(a, b))
            if len(shared) == 1:
                assert bool(got[d, j]) == want, (d, j, tok.decode([rows[d][j]]))
            else:                      # the bytes of one character: only the last token has it
                assert bool(got[d, j]) == (want and j == shared[-1]), (d, j)
    picked = ["".join(tok.decode([row[j]]) for j, x in enumerate(f.tolist()) if x) for row, f in zip(rows, got)]
    assert [p.replace(" ", "") for p in picked] == ["85", "910"], picked
    assert not token_focus(torch.tensor(rows), tok, "zzz").any()
    every = token_focus(torch.tensor(rows), tok, "(?s).")    # all but the first bytes of \u00e9 and \u00fc
    assert every[0].all() and (~every[1]).nonzero().flatten().tolist() == [3, 10]


def test_token_texts_keep_the_spaces_a_sentencepiece_tokenizer_attaches_to_words():
    """With a Metaspace (SentencePiece-style) tokenizer a token decoded alone loses its leading
    space; token_texts keeps it, joined they are the decoded sequence, and a pattern that needs
    the space (' \\d+') marks the digits' tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qstar_ds.heldout import token_texts
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    sp.train_from_iterator(["We have 47 + 38 = 85. Then 12 * 3 = 36, so x = 7. " * 20],
                           trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>")
    ids = tok("Then 12 * 3 = 36, so x = 7 and 47 + 38 = 85")["input_ids"]
    texts = token_texts(ids, tok)
    assert "".join(texts) == tok.decode(ids)
    assert not any(tok.decode([i]).startswith(" ") for i in ids)             # alone, the space is gone
    marked = token_focus(torch.tensor([ids]), tok, r" \d+")[0].tolist()
    assert "".join(t for t, m in zip(texts, marked) if m).replace(" ", "") == "12336,7473885"


def test_focus_summary_equals_brute_force():
    """focus_summary: the gain on the focus tokens and elsewhere (95% CI over sequences that have
    such tokens), their paired difference, each sequence's NLL on its focus tokens (None where it
    has none) and the content effect there, by hand; focus_positions reads x_{i+1}'s flag."""
    g = torch.Generator().manual_seed(3)
    D, P, n = 6, 9, 12
    base = -torch.rand(D, P, generator=g, dtype=torch.float64) * 5
    mixed = base + torch.randn(D, P, generator=g, dtype=torch.float64) * 0.2
    other = base + torch.randn(D, P, generator=g, dtype=torch.float64) * 0.2
    valid = torch.rand(D, P, generator=g) > 0.15
    tok_focus = torch.rand(D, n, generator=g) > 0.6
    tok_focus[2] = False                                 # a sequence without focus tokens
    anchor = torch.arange(P)[None].expand(D, -1) + 1     # position p scores token p + 2
    f = focus_positions(tok_focus, anchor, valid)
    for d in range(D):
        for p in range(P):
            assert bool(f[d, p]) == (bool(tok_focus[d, p + 2]) and bool(valid[d, p]))
    s = {"base": base, "mixed": mixed, "valid": valid}
    m = focus_summary(s, f, {"mixed": other, "valid": valid})
    fo, rest = f, valid & ~f

    def per_seq(x, where):
        return [float(x[d][where[d]].mean()) if where[d].any() else None for d in range(D)]

    def mean_ci(xs):
        xs = [x for x in xs if x is not None]
        mu = sum(xs) / len(xs)
        h = 1.96 * math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))
        return [mu, mu - h, mu + h]
    gain = mixed - base
    assert m["tokens"] == int(fo.sum()) and m["tokens_outside"] == int(rest.sum()) and m["sequences"] == 5
    assert [m["gain"], *m["gain_ci95"]] == pytest.approx(mean_ci(per_seq(gain, fo)), abs=1e-12)
    assert [m["gain_outside"], *m["gain_outside_ci95"]] == pytest.approx(mean_ci(per_seq(gain, rest)), abs=1e-12)
    pairs = [a - b for a, b in zip(per_seq(gain, fo), per_seq(gain, rest)) if a is not None and b is not None]
    assert [m["gain_focus_minus_outside"], *m["gain_focus_minus_outside_ci95"]] == pytest.approx(mean_ci(pairs), abs=1e-12)
    want = per_seq(-mixed, fo)
    assert want[2] is None and m["sequence_nll_thoughts"][2] is None
    assert [x for x in m["sequence_nll_thoughts"] if x is not None] == pytest.approx([x for x in want if x is not None])
    assert m["nll_base"] == pytest.approx(mean_ci(per_seq(-base, fo))[0], abs=1e-12)
    assert m["nll_mixed_outside"] == pytest.approx(mean_ci(per_seq(-mixed, rest))[0], abs=1e-12)
    assert [m["content_gain"], *m["content_gain_ci95"]] == pytest.approx(mean_ci(per_seq(mixed - other, fo)), abs=1e-12)
    assert m["content_gain_outside"] == pytest.approx(mean_ci(per_seq(mixed - other, rest))[0], abs=1e-12)
    assert m["nll_mixed_other"] == pytest.approx(mean_ci(per_seq(-other, fo))[0], abs=1e-12)
    # every valid position in focus: the focus numbers are summarize's
    every = focus_summary(s, valid)
    assert every["gain"] == pytest.approx(summarize({**s, "base_win": base, "mixed_win": mixed,
                                                     "w": base * 0}, 1)["gain"], abs=1e-12)
    assert every["tokens_outside"] == 0


def test_heldout_split_is_disjoint_and_resumable():
    """Training reads only training-side documents, evaluation only held-out ones (checked on the
    decoded text of what each stream yields); about `fraction` of documents are held out; a
    resumed training stream continues at the same sequence."""
    from qstar_ds.data import arith_document
    tok = tiny_tokenizer()
    docs = [arith_document(0, i) for i in range(300)]
    side = [is_heldout(d, 0.2, 0) for d in docs]
    assert 0.12 < sum(side) / len(docs) < 0.28
    for heldout_side in (False, True):
        s = SequenceStream(tok, "arith", 64, holdout=0.2, heldout_side=heldout_side)
        ids, _ = s.next_batch(40)
        text = tok.decode(ids.flatten().tolist())
        read = [d for d, h in zip(docs[:s.doc_index - 1], side) if d in text]
        assert len(read) >= 5
        assert all(is_heldout(d, 0.2, 0) == heldout_side for d in read)
        other = [d for d, h in zip(docs[:s.doc_index], side) if h != heldout_side]
        assert other and not any(d in text for d in other)
    a = SequenceStream(tok, "arith", 16, holdout=0.2)
    a.next_batch(3)
    b = SequenceStream(tok, "arith", 16, holdout=0.2, state=a.state())
    assert_equal(a.next_batch(4)[0], b.next_batch(4)[0], "a.next_batch(4)[0]")


def test_evaluate_nll_task(tmp_path, capsys):
    """python -m qstar_ds.evaluate --tasks nll: any text file, scored as the trainer scores held-out
    text; one clear line for a missing or empty file."""
    from qstar_ds.evaluate import main
    from qstar_ds.data import arith_document
    text = tmp_path / "t.jsonl"
    text.write_text("".join('{"text": "%s"}\n' % arith_document(7, i) for i in range(12)))
    out = tmp_path / "r.json"
    assert main(["--model", "tiny-llama", "--tasks", "nll", "--data", f"nll={text}", "--nll_seq_len", "24",
                 "--nll_sequences", "5", "--talk_len", "2", "--output", str(out)]) == 0
    import json
    res = json.loads(out.read_text())["nll"]
    assert res["sequences"] == 5 and res["tokens"] == 5 * (24 - 2) and res["gain"] == 0.0   # untrained head
    assert "held-out NLL" in capsys.readouterr().out
    assert main(["--model", "tiny-llama", "--tasks", "nll", "--output", str(out)]) == 2
    assert "task nll needs its text: --data nll=FILE" in capsys.readouterr().err
    empty = tmp_path / "e.txt"
    empty.write_text("")
    assert main(["--model", "tiny-llama", "--tasks", "nll", "--data", f"nll={empty}", "--output", str(out)]) == 2
    assert "task nll:" in capsys.readouterr().err
