"""Every attention backend equals the dense reference backend: learn pass values and gradients,
rollout samples and talk log-probs, on random inputs with padding (and GQA)."""
import pytest
import torch

from qstar_ds.attention import BACKENDS
from qstar_ds.config import ThoughtConfig
from qstar_ds.learn import learn_pass
from qstar_ds.rollout import rollout

from conftest import DEVICE, gen, make_model, random_batch, random_thoughts
from helpers import assert_equal

FAST = [b for b in BACKENDS if b != "dense"]


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def dense_and(backend, model, tok, n, r, t, K):
    """Learn pass outputs and parameter gradients of `dense` and `backend` on the same random
    batch (padding on both sides, every position anchored). torch has no FlexAttention backward
    on CPU: there flex gives values only (gradients {}; QSTAR_TEST_DEVICE=cuda checks them)."""
    x, am = random_batch(n, 2, len(tok) - 2, "both")
    anchor = torch.arange(n, device=DEVICE).repeat_interleave(r)[None].expand(2, -1).contiguous()
    thoughts = random_thoughts(2, anchor.shape[1], t, len(tok) - 2)
    with_grad = not (backend == "flex" and DEVICE == "cpu")
    outs, gs = {}, {}
    for b in ("dense", backend):
        cfg = ThoughtConfig(thought_len=t, n_thoughts=r, talk_len=K, beta=0.5, attention_backend=b)
        with torch.set_grad_enabled(with_grad):
            outs[b] = learn_pass(model, cfg, x, am, anchor, thoughts)
        gs[b] = grads(model, outs[b].loss) if with_grad else {}
    assert set(gs[backend]) == set(gs["dense"])
    return outs["dense"], outs[backend], gs["dense"], gs[backend]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("arch,n,r,t,K", [("llama", 9, 2, 3, 2), ("qwen2", 8, 1, 1, 1), ("mistral", 10, 3, 2, 3)])
def test_learn_pass_backend_equals_dense(backend, arch, n, r, t, K):
    if backend == "flex" and DEVICE == "cuda":
        pytest.skip("FlexAttention's CUDA kernels have no float64 (the float32 test covers flex on CUDA)")
    # head_dim 16: FlexAttention's CUDA kernels refuse smaller heads
    model, tok = make_model(arch, dtype=torch.float64, hidden=64)
    a, o, ga, go = dense_and(backend, model, tok, n, r, t, K)
    v = a.valid
    for key in ("thought_logp", "talk_logp", "mix_w"):
        torch.testing.assert_close(getattr(o, key)[v], getattr(a, key)[v], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o.base_logp[a.base_mask], a.base_logp[a.base_mask], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o.loss, a.loss, rtol=1e-10, atol=1e-12)
    for k in ga:
        torch.testing.assert_close(go[k], ga[k], rtol=1e-8, atol=1e-11, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("backend", FAST)
def test_learn_pass_backend_equals_dense_float32(backend):
    """float32 (what GPUs run; FlexAttention's Triton kernels on CUDA), head_dim 16. Tolerance per
    tensor relative to its scale, as in tests/test_equivalence.py's float32 test."""
    model, tok = make_model("llama", dtype=torch.float32, hidden=64, heads=4, kv_heads=2, intermediate=128)
    a, o, ga, go = dense_and(backend, model, tok, 11, 2, 3, 2)

    def close(got, ref, what):
        torch.testing.assert_close(got, ref, rtol=0.0, atol=1e-4 * ref.abs().max().item() + 1e-7,
                                   msg=lambda m: f"{what}: {m}")
    v = a.valid
    for key in ("thought_logp", "talk_logp", "mix_w"):
        close(getattr(o, key)[v], getattr(a, key)[v], key)
    close(o.base_logp[a.base_mask], a.base_logp[a.base_mask], "base_logp")
    close(o.loss, a.loss, "loss")
    for k in ga:
        close(go[k], ga[k], k)


@pytest.mark.parametrize("backend", FAST)
def test_rollout_backend_equals_dense(backend):
    if backend == "flex" and DEVICE == "cuda":
        pytest.skip("FlexAttention's CUDA kernels have no float64")
    model, tok = make_model("llama", dtype=torch.float64, hidden=64)
    x, am = random_batch(9, 2, len(tok) - 2, "both")
    ros = {}
    for b in ("dense", backend):
        cfg = ThoughtConfig(thought_len=4, n_thoughts=2, talk_len=3, attention_backend=b)
        ros[b] = rollout(model, cfg, x, am, generator=gen(3))
    assert_equal(ros["dense"].thoughts, ros[backend].thoughts, "ros['dense'].thoughts")
    v = ros["dense"].valid
    torch.testing.assert_close(ros[backend].talk_logp[v], ros["dense"].talk_logp[v], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ros[backend].rewards, ros["dense"].rewards, rtol=1e-10, atol=1e-10)


def test_flex_refusals_and_auto_is_split():
    from qstar_ds.attention import resolve_backend
    assert resolve_backend("auto") == "split"
    assert resolve_backend("dense") == "dense" and resolve_backend("flex") == "flex"
    cfg = ThoughtConfig(thought_len=1, n_thoughts=1, talk_len=1, attention_backend="flex")
    # (what, dtype, hidden): CPU has no FlexAttention backward; CUDA's kernels have no float64 and
    # no head_dim < 16 (seen on an H200 with torch 2.11: Triton compile errors, "NYI: ... at least 16")
    cases = [("no FlexAttention backward on CPU", torch.float64, 32)] if DEVICE == "cpu" else \
        [("no float64", torch.float64, 64), ("head_dim 8 < 16", torch.float32, 32)]
    for what, dtype, hidden in cases:
        model, tok = make_model("llama", dtype=dtype, hidden=hidden)
        x, am = random_batch(6, 1, len(tok) - 2, None)
        anchor = torch.arange(6, device=DEVICE)[None]
        with pytest.raises(RuntimeError, match=what):
            learn_pass(model, cfg, x, am, anchor, random_thoughts(1, 6, 1, len(tok) - 2))


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_logprobs_equal_unchunked(chunk):
    from qstar_ds.logprobs import chunked_token_logprobs, token_logprobs
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, generator=g, requires_grad=True)
    tgt = torch.randint(0, 48, (3, 7), generator=g)
    masked = torch.tensor([48, 49])
    up = torch.randn(3, 7, dtype=torch.float64, generator=g)
    up[:, ::2] = 0                      # rows with zero upstream gradient are skipped in backward
    up[1] = 0
    z = h @ w.T + b
    z = z.index_fill(-1, masked, float("-inf"))
    ref = token_logprobs(z, tgt, 1.7)
    got = chunked_token_logprobs(h, w, b, tgt, masked, 1.7, chunk)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    gr = torch.autograd.grad((ref * up).sum(), (h, w, b))
    gc = torch.autograd.grad((got * up).sum(), (h, w, b))
    for a, c in zip(gc, gr):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_learn_pass_with_chunked_loss_equals_unchunked():
    model, tok = make_model("llama", dtype=torch.float64, tie=True)
    x, am = random_batch(9, 2, len(tok) - 2, "both")
    anchor = torch.arange(9, device=DEVICE).repeat_interleave(2)[None].expand(2, -1).contiguous()
    thoughts = random_thoughts(2, 18, 2, len(tok) - 2)
    res = {}
    for ch in (0, 7):
        cfg = ThoughtConfig(thought_len=2, n_thoughts=2, talk_len=2, beta=0.5, loss_chunk_tokens=ch,
                            reinforce_temperature=2.0, attention_backend="split")
        out = learn_pass(model, cfg, x, am, anchor, thoughts)
        res[ch] = (out, grads(model, out.loss))
    (a, ga), (b, gb) = res[0], res[7]
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-12, atol=1e-12)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("clip", [True, False])
def test_given_rewards_skip_zero_weight_thoughts_exactly(clip):
    """With rewards given and a chunked loss, thoughts of zero REINFORCE weight are not scored:
    loss and every gradient equal the unchunked pass that scores them all."""
    model, tok = make_model("llama", dtype=torch.float64, tie=True)
    x, am = random_batch(9, 2, len(tok) - 2, "both")
    anchor = torch.arange(9, device=DEVICE).repeat_interleave(2)[None].expand(2, -1).contiguous()
    thoughts = random_thoughts(2, 18, 2, len(tok) - 2)
    rewards = torch.randn(2, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    rewards[0, :4] = 0
    res = {}
    for ch in (0, 5):
        cfg = ThoughtConfig(thought_len=2, n_thoughts=2, talk_len=2, beta=0.5, loss_chunk_tokens=ch,
                            clip_negative_rewards=clip, attention_backend="split")
        out = learn_pass(model, cfg, x, am, anchor, thoughts, rewards=rewards)
        res[ch] = (out, grads(model, out.loss))
    (a, ga), (b, gb) = res[0], res[5]
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-12, atol=1e-12)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
    w = (rewards.clamp(min=0) if clip else rewards) != 0
    w = w & a.valid
    assert bool((~w).any()) and bool(w.any())
    torch.testing.assert_close(b.thought_logp[w], a.thought_logp[w], rtol=1e-12, atol=1e-12)
    assert bool((b.thought_logp[~w] == 0).all())
