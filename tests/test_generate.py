"""KV-cached generation with thoughts against obviously-right references."""
import math
import subprocess
import sys

import pytest
import torch

from qstar_ds.config import ThoughtConfig
from qstar_ds.generate import GenerateConfig, entropy, generate, left_pad
from qstar_ds.learn import learn_pass
from qstar_ds.reference import _embed, _mix_weight, attn_implementation

from conftest import DEVICE, gen, make_model
from helpers import assert_equal


def prompts(tok):
    # different lengths -> row 1 is left-padded
    texts = ["Let x = 3 and y = 4. Then x + y =", "The sum is"]
    return left_pad(tok, texts, DEVICE)


def reference_logprobs(model, prefix: list[int], thought: list[int] | None, resume: bool = False) -> torch.Tensor:
    """(V,) next-token log-probs after `prefix` from plain HF passes, one sequence each: the base
    state of the last token, the state at <eot> of prefix + <sot> thought <eot>, mixed by the
    written-out mixing MLP (states, or with model.mix_rule=prob the two distributions); markers
    masked. `resume`: <eot> at position len(prefix), right after the prefix
    (thought.talk_positions=resume)."""
    def logp(h):
        z = h @ model.lm_head.weight.T
        z[[model.sot_id, model.eot_id]] = float("-inf")
        return torch.log_softmax(z.double(), -1)

    backbone = model.base.base_model
    with attn_implementation(model.base, "sdpa"):
        hb = backbone(inputs_embeds=_embed(model, prefix)).last_hidden_state[0, -1]
        if thought is None:
            return logp(hb)
        seq = prefix + [model.sot_id] + thought + [model.eot_id]
        pos = list(range(len(seq) - 1)) + [len(prefix) if resume else len(seq) - 1]
        ht = backbone(inputs_embeds=_embed(model, seq),
                      position_ids=torch.tensor([pos], device=DEVICE)).last_hidden_state[0, -1]
        w = _mix_weight(model, hb, ht)
        if model.mix_rule == "hidden":
            return logp((1 - w) * hb + w * ht)
        w = torch.sigmoid(w + math.log(model.mix_init / (1 - model.mix_init)))
        return torch.log((1 - w) * logp(hb).exp() + w * logp(ht).exp())


@pytest.mark.parametrize("arch,backend,talk_positions,mix_rule", [
    ("llama", "dense", "after_thought", "hidden"), ("llama", "split", "after_thought", "hidden"),
    ("qwen2", "split", "after_thought", "hidden"), ("mistral", "dense", "after_thought", "hidden"),
    ("llama", "split", "resume", "hidden"), ("qwen2", "split", "resume", "prob")])
def test_generation_distribution_equals_reference_and_learn_pass(arch, backend, talk_positions, mix_rule):
    model, tok = make_model(arch, dtype=torch.float64)
    model.set_mix_rule(mix_rule, 0.2)
    t, T = 3, 5
    cfg = ThoughtConfig(thought_len=t, n_thoughts=1, talk_len=1, attention_backend=backend,
                        talk_positions=talk_positions)
    ids, am = prompts(tok)
    g = generate(model, ids, am, cfg, GenerateConfig(max_new_tokens=T, temperature=1.0), generator=gen(3),
                 return_scores=True)
    assert g.tokens.shape == (2, T) and g.thoughts.shape == (2, T, t) and bool(g.thought_mask.all())
    assert not bool(((g.thoughts == model.sot_id) | (g.thoughts == model.eot_id)).any())
    for b in range(2):
        prompt = ids[b][am[b].bool()].tolist()
        for j in range(T):
            prefix = prompt + g.tokens[b, :j].tolist()
            ref = reference_logprobs(model, prefix, g.thoughts[b, j].tolist(), talk_positions == "resume")
            finite = torch.isfinite(ref)
            assert_equal(finite, torch.isfinite(g.scores[b, j]), "finite")
            torch.testing.assert_close(g.scores[b, j][finite].double(), ref[finite], rtol=0, atol=1e-8)
    # the learn pass's talk distribution for the same prefix and the same thought (K = 1)
    x = torch.cat([ids, g.tokens], 1)
    xm = torch.cat([am, torch.ones_like(g.tokens)], 1)
    n0 = ids.shape[1]
    anchor = torch.arange(n0 - 1, n0 - 1 + T, device=DEVICE)[None].expand(2, -1).contiguous()
    with torch.no_grad():
        out = learn_pass(model, cfg, x, xm, anchor, g.thoughts)
    chosen = g.scores.gather(-1, g.tokens[..., None])[..., 0].double()
    torch.testing.assert_close(out.talk_logp[..., 0], chosen, rtol=0, atol=1e-8)
    torch.testing.assert_close(out.mix_w[..., 0], g.mix_w.double(), rtol=0, atol=1e-8)


def test_thoughts_off_equals_hf_generate():
    model, tok = make_model("llama", dtype=torch.float64)
    ids, am = prompts(tok)
    model.base.generation_config.eos_token_id = None
    model.base.generation_config.pad_token_id = 0
    hf = model.base.generate(input_ids=ids, attention_mask=am, do_sample=False, max_new_tokens=8,
                             output_scores=True, return_dict_in_generate=True)
    cfg = ThoughtConfig(thought_len=2, attention_backend="split")
    ours = generate(model, ids, am, cfg, GenerateConfig(max_new_tokens=8, thoughts=False), return_scores=True)
    assert_equal(ours.tokens, hf.sequences[:, ids.shape[1]:], "ours.tokens, hf.sequences[:")
    assert not bool(ours.thought_mask.any()) and ours.thoughts is None
    for j, s in enumerate(hf.scores):
        ref = torch.log_softmax(s.double().index_fill(-1, torch.tensor([model.sot_id, model.eot_id]),
                                                      float("-inf")), -1)
        fin = torch.isfinite(ref)
        # 1e-6: HF's cached decoding takes SDPA's is_causal/no-mask kernels, ~1e-8 off an explicit mask
        torch.testing.assert_close(ours.scores[:, j][fin].double(), ref[fin], rtol=0, atol=1e-6)


def test_cost_per_token_is_constant_and_cache_holds_only_base_tokens():
    """Each generated token costs t thought steps of 1 token, one step of 2 (c_t, <eot>) and one
    step for the new token, whatever the prefix length; earlier thoughts are never re-run."""
    model, tok = make_model("llama", dtype=torch.float32)
    t, T = 4, 6
    cfg = ThoughtConfig(thought_len=t, attention_backend="split")
    fed = []
    hook = model.base.base_model.register_forward_hook(
        lambda mod, args, kw, out: fed.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        for text in ["x", "Let x = 3 and y = 4. Then x + y = 7 and x * y = 12. The sum of the"]:
            fed.clear()
            ids, am = left_pad(tok, [text], DEVICE)
            generate(model, ids, am, cfg, GenerateConfig(max_new_tokens=T))
            per_token = [1] * t + [2]
            assert fed == [ids.shape[1]] + (per_token + [1]) * (T - 1) + per_token
    finally:
        hook.remove()


def test_think_threshold():
    model, tok = make_model("llama", dtype=torch.float64)
    ids, am = prompts(tok)
    cfg = ThoughtConfig(thought_len=2)

    def run(**kw):
        return generate(model, ids, am, cfg, GenerateConfig(max_new_tokens=6, **kw), generator=gen(0),
                        return_scores=True)

    always, zero = run(), run(think_threshold=0.0)
    assert_equal(always.tokens, zero.tokens, "tokens (always think vs threshold 0)")
    assert always.think_rate == 1.0
    never, off = run(think_threshold=1e9), run(thoughts=False)
    assert never.think_rate == 0.0 and torch.equal(never.tokens, off.tokens)
    torch.testing.assert_close(never.scores, off.scores, rtol=0, atol=0)
    # a threshold between the per-token base entropies: thinks exactly where entropy >= it
    ent = entropy(off.scores)                                     # (B, T) of the greedy base path
    thr = float(ent.median())
    mid = run(think_threshold=thr)
    assert 0.0 < mid.think_rate < 1.0
    first = ent[:, 0] >= thr
    assert_equal(mid.thought_mask[:, 0], first, "mid.thought_mask[:, 0]")
    # where it did not think, the distribution is the base one
    base_first = off.scores[:, 0]
    torch.testing.assert_close(mid.scores[~first, 0], base_first[~first], rtol=0, atol=0)


def test_generate_errors():
    model, tok = make_model("llama", dtype=torch.float32)
    ids, am = prompts(tok)
    right = am.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, right, ThoughtConfig(), GenerateConfig())
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        GenerateConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ids, am, ThoughtConfig(), GenerateConfig(stop=["\n"]))


def test_stop_strings():
    model, tok = make_model("llama", dtype=torch.float32)
    ids, am = prompts(tok)
    cfg = ThoughtConfig(thought_len=2)
    free = generate(model, ids, am, cfg, GenerateConfig(max_new_tokens=10), generator=gen(0))
    text = tok.decode(free.tokens[0, :4].tolist())
    stop = text[-1]                                             # a character row 0 produces by token 4
    g = generate(model, ids, am, cfg, GenerateConfig(max_new_tokens=10, stop=[stop]), tokenizer=tok,
                 generator=gen(0))
    L = int(g.lengths[0])
    assert L <= 4 and stop in tok.decode(g.tokens[0, :L].tolist())
    assert stop not in tok.decode(g.tokens[0, :L - 1].tolist())
    assert_equal(g.tokens[0, :L], free.tokens[0, :L], "g.tokens[0, :L], free.tokens[0")


def test_generate_cli_shows_thoughts_and_speed():
    res = subprocess.run([sys.executable, "-m", "qstar_ds.generate", "--model", "tiny-llama", "--prompt", "Let x =",
                          "--prompt", "The sum", "--max_new_tokens", "5", "--thought_len", "3", "--show_thoughts"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("⟨") == 10 and "tokens/s" in res.stdout and "100.0% of tokens" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "qstar_ds.generate", "--model", "tiny-llama", "--prompt", "x",
                          "--max_new_tokens", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "max_new_tokens=0" in bad.stderr and "Traceback" not in bad.stderr
