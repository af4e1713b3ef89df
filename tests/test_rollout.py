"""Rollout: KV-cached parallel sampling, equality with the learn pass, sampling semantics."""
import pytest
import torch

from qstar_ds.config import ThoughtConfig
from qstar_ds.learn import learn_pass
from qstar_ds.reference import attn_implementation
from qstar_ds.rollout import default_positions, rollout, step_positions

from conftest import DEVICE, gen, make_model, random_batch
from helpers import assert_equal


def cfg_for(**kw):
    base = dict(thought_len=3, n_thoughts=2, talk_len=2, temperature=1.0)
    base.update(kw)
    return ThoughtConfig(**base)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("t,K,r,talk_positions", [(3, 2, 2, "after_thought"), (1, 1, 3, "after_thought"),
                                                  (2, 3, 1, "after_thought"), (3, 3, 2, "resume")])
def test_rollout_talk_and_rewards_equal_learn_pass(arch, t, K, r, talk_positions):
    model, tok = make_model(arch, dtype=torch.float64)
    cfg = cfg_for(thought_len=t, talk_len=K, n_thoughts=r, talk_positions=talk_positions)
    x, am = random_batch(9, 2, len(tok) - 2, "both")
    ro = rollout(model, cfg, x, am, positions=torch.arange(9, device=DEVICE), generator=gen(1))
    assert ro.thoughts.shape == (2, 9 * r, t) and ro.anchor.shape == (2, 9 * r)
    with torch.no_grad():
        out = learn_pass(model, cfg, x, am, ro.anchor, ro.thoughts)
    assert_equal(out.valid, ro.valid, "out.valid")
    v = ro.valid
    torch.testing.assert_close(ro.talk_logp[v], out.talk_logp[v], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ro.mix_w[v], out.mix_w[v], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ro.rewards, out.rewards, rtol=1e-10, atol=1e-10)
    assert torch.all(ro.rewards[~v] == 0)
    if r > 1:
        assert ro.rewards[v].abs().max() > 0


def test_rollout_read_rewards_equal_learn_pass():
    model, tok = make_model("llama", dtype=torch.float64)
    cfg = cfg_for(reward="read")
    x, am = random_batch(9, 2, len(tok) - 2, "both")
    ro = rollout(model, cfg, x, am, positions=torch.arange(9, device=DEVICE), generator=gen(1))
    with torch.no_grad():
        out = learn_pass(model, cfg, x, am, ro.anchor, ro.thoughts)
    v = ro.valid
    torch.testing.assert_close(ro.read_logp[v], out.read_logp[v], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ro.rewards, out.rewards, rtol=1e-10, atol=1e-10)
    mixed = rollout(model, cfg_for(), x, am, positions=torch.arange(9, device=DEVICE), generator=gen(1))
    assert mixed.read_logp is None
    assert (mixed.rewards[v] - ro.rewards[v]).abs().max() > 1e-3


def test_seeded_and_reproducible_and_markers_never_sampled():
    model, tok = make_model("llama", dtype=torch.float32)
    with torch.no_grad():  # make the markers the most likely tokens, were they not masked
        model.base.get_output_embeddings().weight[[model.sot_id, model.eot_id]] *= 50
    cfg = cfg_for(thought_len=4)
    x, am = random_batch(10, 2, len(tok) - 2, None)
    a = rollout(model, cfg, x, am, generator=gen(5))
    b = rollout(model, cfg, x, am, generator=gen(5))
    c = rollout(model, cfg, x, am, generator=gen(6))
    assert_equal(a.thoughts, b.thoughts, "thoughts (same seed)")
    assert_equal(a.talk_logp, b.talk_logp, "talk log-probs (same seed)")
    assert not torch.equal(a.thoughts, c.thoughts)
    assert not torch.isin(a.thoughts, torch.tensor([model.sot_id, model.eot_id], device=DEVICE)).any()


def greedy_reference(model, x_row, am_row, i, t):
    """Greedy thought after base index i with the plain HF model, one token at a time."""
    real = [k for k in range(len(x_row)) if am_row[k]]
    seq = [int(x_row[k]) for k in real[:real.index(i) + 1]] + [model.sot_id]
    out = []
    with attn_implementation(model.base, "sdpa"), torch.no_grad():
        for _ in range(t):
            e = model.embed(torch.tensor([seq], device=DEVICE))
            logits = model.logits(model.base.base_model(inputs_embeds=e).last_hidden_state[0, -1])
            nxt = int(logits.argmax())
            out.append(nxt)
            seq.append(nxt)
    return out


@pytest.mark.parametrize("mode", ["low_temperature", "top_k_1"])
def test_sampling_follows_the_model_distribution(mode):
    model, tok = make_model("qwen2", dtype=torch.float64)
    kw = dict(temperature=1e-6) if mode == "low_temperature" else dict(temperature=2.0, top_k=1)
    cfg = cfg_for(thought_len=4, n_thoughts=1, **kw)
    x, am = random_batch(8, 2, len(tok) - 2, "left")
    ro = rollout(model, cfg, x, am, generator=gen(0))
    for b in range(2):
        for m, i in enumerate(ro.anchor[b].tolist()):
            if am[b, i]:
                assert ro.thoughts[b, m].tolist() == greedy_reference(model, x[b], am[b], i, 4), (b, i)


def test_top_k_restricts_samples():
    model, tok = make_model("llama", dtype=torch.float32)
    cfg = cfg_for(thought_len=1, n_thoughts=8, top_k=3, temperature=5.0)
    x, am = random_batch(6, 1, len(tok) - 2, None)
    ro = rollout(model, cfg, x, am, positions=torch.tensor([2], device=DEVICE), generator=gen(0))
    with torch.no_grad():
        from qstar_ds.layout import Layout
        h = model.hidden(torch.cat([x[:, :3], torch.tensor([[model.sot_id]], device=DEVICE)], 1),
                         Layout.base_only(torch.ones(1, 4, dtype=torch.bool, device=DEVICE)))
        top3 = set(model.logits(h[0, -1]).topk(3).indices.tolist())
    assert set(ro.thoughts[0, :, 0].tolist()) <= top3


def test_prefix_is_encoded_once():
    model, tok = make_model("mistral", dtype=torch.float32)
    cfg = cfg_for(thought_len=5, talk_len=3, n_thoughts=2)
    x, am = random_batch(12, 2, len(tok) - 2, None)
    lengths = []
    hook = model.base.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        ro = rollout(model, cfg, x, am)
    finally:
        hook.remove()
    M = ro.anchor.shape[1]
    assert M == (12 - 3) * 2
    # one prefill of n tokens, then t steps of one token per stream, then c_t + <eot> + K-1 talk
    assert lengths == [12] + [M] * 5 + [M * 4]


def test_positions_and_errors():
    model, tok = make_model("llama", dtype=torch.float32)
    cfg = cfg_for(talk_len=3, n_thoughts=2)
    x, am = random_batch(8, 1, len(tok) - 2, None)
    ro = rollout(model, cfg, x, am, positions=torch.tensor([1, 4, 6], device=DEVICE))
    assert ro.anchor[0].tolist() == [1, 1, 4, 4, 6, 6]
    assert ro.valid[0].tolist() == [True, True, True, True, False, False]     # 6 + 3 > 7
    assert torch.all(ro.rewards[0, 4:] == 0)
    with pytest.raises(ValueError, match="positions must lie in"):
        rollout(model, cfg, x, am, positions=torch.tensor([8], device=DEVICE))
    with pytest.raises(ValueError, match="shorter than talk_len"):
        rollout(model, cfg, x[:, :3], am[:, :3])


def test_counter_noise_gives_the_same_thoughts_whatever_the_cut():
    """rollout.Noise: a batch, each sequence alone, and each half of the positions alone sample
    the same thoughts (what lets the trainer split a step's rollout over ranks)."""
    from qstar_ds.rollout import sequence_noise
    model, tok = make_model("llama", dtype=torch.float64)
    cfg = cfg_for(thought_len=3, n_thoughts=2, talk_len=2)
    x, am = random_batch(12, 2, len(tok) - 2, "both")
    pos = torch.arange(10, device=DEVICE)
    whole = rollout(model, cfg, x, am, pos, generator=sequence_noise(0, 5, [0, 1], DEVICE))
    for s in (0, 1):
        alone = rollout(model, cfg, x[s:s + 1], am[s:s + 1], pos, generator=sequence_noise(0, 5, [s], DEVICE))
        assert_equal(alone.thoughts[0], whole.thoughts[s], f"thoughts of sequence {s} alone")
        for a, b in ((0, 4), (4, 10)):
            part = rollout(model, cfg, x[s:s + 1], am[s:s + 1], pos[a:b], generator=sequence_noise(0, 5, [s], DEVICE))
            assert_equal(part.thoughts[0], whole.thoughts[s, a * 2:b * 2], f"thoughts of sequence {s}, positions {a}..{b}")
            torch.testing.assert_close(part.rewards[0], whole.rewards[s, a * 2:b * 2], rtol=1e-10, atol=1e-10)
    other = rollout(model, cfg, x, am, pos, generator=sequence_noise(0, 6, [0, 1], DEVICE))
    assert not torch.equal(other.thoughts, whole.thoughts)              # another step, other thoughts
    # the noise is uniform: 20000 draws, mean 1/2 and variance 1/12 within 4 standard errors
    u = sequence_noise(3, 1, list(range(100)), DEVICE).at(torch.arange(100, device=DEVICE).repeat(100, 2), 2, 0)
    assert abs(u.mean().item() - 0.5) < 4 * (1 / 12 / u.numel()) ** 0.5
    assert abs(u.var().item() - 1 / 12) < 0.005 and 0 <= u.min() and u.max() < 1


def test_step_positions_are_a_fresh_uniform_draw_each_step_the_same_everywhere():
    n, K, P = 40, 4, 9
    draws = [step_positions(n, K, P, seed=3, step=s) for s in range(400)]
    for d in draws[:20]:
        assert d.numel() == P and d.unique().numel() == P and bool((d[1:] > d[:-1]).all())
        assert 0 <= int(d.min()) and int(d.max()) < n - K
    assert len({tuple(d.tolist()) for d in draws}) == len(draws), "every step draws anew"
    assert_equal(step_positions(n, K, P, seed=3, step=7), draws[7], "same seed and step")
    assert not torch.equal(step_positions(n, K, P, seed=4, step=7), draws[7])
    counts = torch.bincount(torch.cat(draws), minlength=n - K).double()
    expected = 400 * P / (n - K)                           # 100 per position
    assert float(counts.min()) > expected * 0.6 and float(counts.max()) < expected * 1.4, counts
    for every in (0, n - K):
        assert_equal(step_positions(n, K, every, seed=3, step=7), default_positions(n, K), "all positions")


def test_step_positions_take_the_preferred_ones_first():
    """prefer (thought.position_focus): with fewer preferred positions than P, all of them think
    and the draw fills the rest from the others in its own order; with more, P of them, by the
    same hash order as without a preference; no preference is the plain draw."""
    n, K, P = 40, 4, 9
    assert_equal(step_positions(n, K, P, seed=3, step=5, prefer=None), step_positions(n, K, P, seed=3, step=5), "none")
    few = torch.zeros(n - K, dtype=torch.bool)
    few[[2, 17, 30]] = True
    got = step_positions(n, K, P, seed=3, step=5, prefer=few)
    assert {2, 17, 30} <= set(got.tolist()) and got.numel() == P and bool((got[1:] > got[:-1]).all())
    rest = step_positions(n, K, n - K - 3, seed=3, step=5, prefer=~few)     # the draw among the others
    for k in range(P - 3, 0, -1):           # the fill is a prefix of the others' draw order
        fill = set(step_positions(n, K, 3 + k, seed=3, step=5, prefer=few).tolist()) - {2, 17, 30}
        assert len(fill) == k and fill <= set(rest.tolist())
    many = torch.zeros(n - K, dtype=torch.bool)
    many[::2] = True                                                # 18 preferred > P
    got = step_positions(n, K, P, seed=3, step=5, prefer=many)
    assert all(i % 2 == 0 for i in got.tolist()) and got.numel() == P
    # among the preferred, the same order as the plain draw: the plain draw of P' positions
    # restricted to even ones is a prefix of what the preference picks
    for Q in range(1, 36):
        evens = [i for i in step_positions(n, K, Q, seed=3, step=5).tolist() if i % 2 == 0]
        if len(evens) >= P:
            break
        assert set(evens) <= set(got.tolist())


def test_oracle_thoughts_against_a_loop():
    """rollout.oracle_thoughts: x_{i+1..i+t} after anchor i where x_{i+1} is marked (filler past
    the end and on padding), the filler thought elsewhere; every anchor without a mark."""
    from qstar_ds.rollout import oracle_thoughts
    g = torch.Generator().manual_seed(0)
    B, n, t, fill = 3, 10, 4, 99
    ids = torch.randint(0, 50, (B, n), generator=g)
    mask = torch.ones(B, n, dtype=torch.long)
    mask[1, 7:] = 0
    anchor = torch.tensor([[0, 0, 4, 4, 8, 8]] * B)
    marked = torch.rand(B, n, generator=g) < 0.5
    for mk in (marked, None):
        got = oracle_thoughts(ids, mask, anchor, mk, t, fill)
        for b in range(B):
            for m, i in enumerate(anchor[b].tolist()):
                on = mk is None or bool(mk[b, i + 1])
                want = [int(ids[b, j]) if on and j < n and mask[b, j] else fill for j in range(i + 1, i + 1 + t)]
                assert got[b, m].tolist() == want, (b, m, mk is None)
    assert (oracle_thoughts(ids, mask, anchor, marked, t, fill) != fill).any()


@pytest.mark.parametrize("noise", ["counter", "generator"])
def test_partial_thoughts_sample_where_negative_and_feed_the_rest(noise):
    """rollout(partial=True): the streams whose fed entries are < 0 get exactly the thoughts a full
    sampling draws (same seed), the others get the fed thought, and the talk log-probs equal a
    rollout fed the combined thoughts."""
    from qstar_ds.rollout import sequence_noise
    model, tok = make_model("llama", dtype=torch.float32)
    cfg = cfg_for(thought_len=3, n_thoughts=1)
    x, am = random_batch(9, 2, len(tok) - 2, None)
    g = (lambda: sequence_noise(1, 2, [3, 4], DEVICE)) if noise == "counter" else (lambda: gen(7))
    full = rollout(model, cfg, x, am, generator=g())
    fed = torch.randint(0, len(tok) - 2, full.thoughts.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    sample = torch.zeros(full.thoughts.shape[:2], dtype=torch.bool, device=DEVICE)
    sample[0, ::2] = sample[1, 1::3] = True
    part = rollout(model, cfg, x, am, generator=g(), thoughts=torch.where(sample[..., None], -1, fed), partial=True)
    want = torch.where(sample[..., None], full.thoughts, fed)
    assert_equal(part.thoughts, want, "partial thoughts")
    assert not torch.equal(want, fed)
    ref = rollout(model, cfg, x, am, generator=g(), thoughts=want)
    assert_equal(part.talk_logp, ref.talk_logp, "talk log-probs")


def test_teacher_thoughts_against_a_loop():
    """teacher.teacher_thoughts: after anchor i whose decoded prefix x_0..x_i ends with
    "a + b =", optionally " " and digits (a a whole number), the units step of a + b padded with the filler;
    the filler thought elsewhere and on padding; sampled_where_asked puts -1 exactly there."""
    import re

    from qstar_ds.teacher import sampled_where_asked, teacher_thoughts
    from qstar_ds.tiny import tiny_tokenizer
    tok = tiny_tokenizer()
    texts = ["Compute 18 + 16. We have 18 + 16 = 34. Then 7 + 45 = 52 and 3.5 + 2 = 5.5, x + 4 = 9.",
             "First 29 + 80 = 109, then 109 * 8 = 872. Also 120 + 5 = 125",
             "no sums here at all, 4 - 3 = 1 and 2 * 2 = 4; 61 + 9 = 70"]
    rows = [tok(s).input_ids for s in texts]
    n = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    t, fill = 6, 5
    anchor = torch.arange(n)[None].expand(3, -1)
    th, on = teacher_thoughts(ids, mask, anchor, tok, t, fill)
    rx = re.compile(r"(?:^|[^\d.])(\d+) \+ (\d+) =(?: \d*)?$")
    steps = 0
    for b, row in enumerate(rows):
        for i in range(n):
            m = rx.search(tok.decode(row[:i + 1])) if i < len(row) else None
            want = [fill] * t
            if m:
                a, c = int(m.group(1)) % 10, int(m.group(2)) % 10
                s = tok(f"{a}+{c}={a + c}", add_special_tokens=False).input_ids
                want = s + [fill] * (t - len(s))
                steps += 1
            assert th[b, i].tolist() == want and bool(on[b, i]) == bool(m), (b, i, tok.decode(row[:i + 1]))
    assert steps >= 12
    part = sampled_where_asked(ids, mask, anchor, tok, t, fill)
    assert ((part == -1).all(-1) == on).all() and (part[~on] == fill).all()
    with pytest.raises(ValueError, match="thought_len=3"):
        teacher_thoughts(ids, mask, anchor, tok, 3, fill)
