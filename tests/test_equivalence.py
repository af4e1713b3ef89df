"""The packed learn pass equals the obviously-right per-sequence reference: values and gradients
of every trainable parameter, for Llama, Mistral and Qwen2, with padding, on random inputs.

Tolerance: |ours - ref| <= rtol * max|ref| over each tensor (relative to the tensor's scale).
Element-wise relative error is meaningless for gradient entries near zero: HF's own attention
paths are not exact in float64 (eager takes its softmax in float32; SDPA's causal CPU kernel
differs from an explicit-mask SDPA by ~1e-8 relative in backward), while our packed pass agrees
with a hand-written float64 softmax to 1e-16.
"""
import pytest
import torch

from qstar_ds.config import ThoughtConfig
from qstar_ds.learn import learn_pass
from qstar_ds.reference import reference_pass

from conftest import DEVICE, make_model, random_batch, random_thoughts

SHAPES = [  # (n, r, thought_len, K)
    (8, 2, 3, 2),
    (7, 1, 2, 3),   # r = 1: zero rewards
    (9, 3, 1, 2),   # thought_len = 1
    (8, 2, 2, 1),   # K = 1
]


def run_both(arch, n, r, t, K, dtype=torch.float64, pad="both", attn="sdpa", tie=False, clip=True,
             seed=0, reinforce_temperature=None, w_read=0.0, reward="mixed", talk_positions="after_thought",
             mix_rule="hidden"):
    model, tok = make_model(arch, dtype=dtype, seed=seed, tie=tie)
    model.set_mix_rule(mix_rule, 0.3)
    cfg = ThoughtConfig(thought_len=t, n_thoughts=r, talk_len=K, beta=0.7, w_talk=0.4, w_base=0.6,
                        temperature=1.3, clip_negative_rewards=clip,
                        reinforce_temperature=reinforce_temperature, w_read=w_read, reward=reward,
                        talk_positions=talk_positions)
    B = 2
    x, am = random_batch(n, B, len(tok) - 2, pad, seed)
    # every position, including those whose talk window runs past the end or into padding
    anchor = torch.arange(n, device=DEVICE).repeat_interleave(r)[None].expand(B, -1).contiguous()
    thoughts = random_thoughts(B, anchor.shape[1], t, len(tok) - 2, seed)

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}

    out = learn_pass(model, cfg, x, am, anchor, thoughts)
    g_out = grads(out.loss)
    ref = reference_pass(model, cfg, x, am, anchor, thoughts, attn=attn)
    g_ref = grads(ref["loss"])
    return model, out, g_out, ref, g_ref


def close_to(a, b, rtol, msg=""):
    """|a - b| <= rtol * max(|b|) (+1e-12 for all-zero tensors)."""
    scale = b.detach().abs().max().item()
    torch.testing.assert_close(a, b, rtol=0.0, atol=rtol * scale + 1e-12,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)


def assert_equal_to_reference(out, g_out, ref, g_ref, rtol):
    valid_pairs = {(b, m) for b, m in (out.valid.nonzero().tolist())}
    assert valid_pairs == set(ref["streams"]), "stream validity differs from the reference"
    assert 0 < len(valid_pairs) < out.valid.numel(), "test must mix valid and excluded streams"
    for (b, m), v in ref["streams"].items():
        close_to(out.thought_logp[b, m], v["thought_logp"], rtol)
        close_to(out.talk_logp[b, m], v["talk_logp"], rtol)
        close_to(out.mix_w[b, m], v["mix_w"], rtol)
        torch.testing.assert_close(out.rewards[b, m], ref["rewards"][(b, m)], rtol=0.0, atol=rtol)
    assert {(b, i) for b, i in out.base_mask.nonzero().tolist()} == set(ref["base"])
    for (b, i), v in ref["base"].items():
        close_to(out.base_logp[b, i], v, rtol)
    for key in ("talk", "base", "reinforce"):
        close_to(out.losses[key], ref["losses"][key], rtol, key)
    if out.read_logp is not None:
        for (b, m), v in ref["streams"].items():
            close_to(out.read_logp[b, m], v["read_logp"], rtol)
    if out.losses["read"].abs() > 0:     # counted only with thought.w_read > 0
        close_to(out.losses["read"], ref["losses"]["read"], rtol, "read")
    close_to(out.loss, ref["loss"], rtol, "loss")
    assert set(g_out) == set(g_ref)
    for name in g_ref:
        close_to(g_out[name], g_ref[name], rtol, name)
    for name in ("thought_embedding.weight", "mixing_head.net.0.weight", "mixing_head.net.4.weight"):
        assert g_ref[name].abs().max() > 0, f"{name} got no gradient: the test would not see a bug"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("n,r,t,K", SHAPES)
def test_learn_pass_equals_reference_float64(arch, n, r, t, K):
    _, out, g_out, ref, g_ref = run_both(arch, n, r, t, K)
    assert_equal_to_reference(out, g_out, ref, g_ref, rtol=1e-5)
    if r > 1:
        assert out.losses["reinforce"].abs() > 0


def test_learn_pass_equals_reference_float32():
    _, out, g_out, ref, g_ref = run_both("llama", 8, 2, 3, 2, dtype=torch.float32)
    assert_equal_to_reference(out, g_out, ref, g_ref, rtol=1e-4)


@pytest.mark.parametrize("pad", ["left", "right", None])
def test_padding_sides(pad):
    _, out, g_out, ref, g_ref = run_both("qwen2", 8, 2, 2, 2, pad=pad)
    assert_equal_to_reference(out, g_out, ref, g_ref, rtol=1e-5)


def test_reference_under_eager_attention():
    _, out, g_out, ref, g_ref = run_both("mistral", 8, 2, 2, 2, attn="eager")
    assert_equal_to_reference(out, g_out, ref, g_ref, rtol=1e-5)


def test_tied_embeddings_no_clipping_and_reinforce_temperature():
    _, out, g_out, ref, g_ref = run_both("llama", 8, 2, 2, 3, tie=True, clip=False, reinforce_temperature=3.0)
    assert_equal_to_reference(out, g_out, ref, g_ref, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_read_loss_and_rewards_from_the_thought_alone(arch):
    """thought.w_read > 0 (the post-thought states' own NLL) and thought.reward = read."""
    _, out, g_out, ref, g_ref = run_both(arch, 8, 2, 2, 3, w_read=0.8, reward="read")
    assert_equal_to_reference(out, g_out, ref, g_ref, rtol=1e-5)
    assert out.losses["read"] > 0 and out.losses["reinforce"].abs() > 0
    v = out.valid
    mixed = out.talk_logp.sum(-1) - out.talk_logp.sum(-1).view(2, -1, 2).mean(-1).repeat_interleave(2, -1)
    assert (out.rewards[v] - mixed[v]).abs().max() > 1e-3, "read rewards must differ from mixed ones"
    _, plain, g_plain, _, _ = run_both(arch, 8, 2, 2, 3)
    assert plain.read_logp is None and plain.losses["read"] == 0
    assert any((g_plain[k] - g_out[k]).abs().max() > 1e-6 for k in g_out), "w_read must change the gradient"


@pytest.mark.parametrize("arch,pad", [("llama", "both"), ("qwen2", "left"), ("mistral", "right")])
def test_resume_talk_positions_equal_reference(arch, pad):
    """thought.talk_positions=resume: <eot> and the talk inputs take the positions the text would
    have had without the thought (the reference passes those position ids explicitly)."""
    _, out, g_out, ref, g_ref = run_both(arch, 8, 2, 3, 3, pad=pad, w_read=0.5, talk_positions="resume")
    assert_equal_to_reference(out, g_out, ref, g_ref, rtol=1e-5)
    _, plain, _, _, _ = run_both(arch, 8, 2, 3, 3, pad=pad, w_read=0.5)
    v = out.valid
    assert (plain.talk_logp[v] - out.talk_logp[v]).abs().max() > 1e-4, "the positions must change the talk"
    torch.testing.assert_close(plain.thought_logp, out.thought_logp, rtol=0, atol=1e-12)   # thoughts keep theirs


@pytest.mark.parametrize("arch,pad,K", [("llama", "both", 3), ("qwen2", "left", 1)])
def test_probability_mixing_rule_equals_reference(arch, pad, K):
    """model.mix_rule=prob: log((1 - w) p_base + w p_thought) with w = sigmoid(head + logit(0.3)),
    written out per token in the reference; values and gradients, with the read loss on."""
    model, out, g_out, ref, g_ref = run_both(arch, 8, 2, 3, K, pad=pad, w_read=0.5, mix_rule="prob")
    assert_equal_to_reference(out, g_out, ref, g_ref, rtol=1e-5)
    w = out.mix_w[out.valid]
    assert bool(((w > 0) & (w < 1)).all()) and w.std() > 1e-3, "a random head gives per-position weights in (0, 1)"
    _, hidden, _, _, _ = run_both(arch, 8, 2, 3, K, pad=pad, w_read=0.5)
    assert (hidden.talk_logp - out.talk_logp)[out.valid].abs().max() > 1e-3, "the rule must change the prediction"
