"""QuietStarModel: thought tokens, initialisation, mixing head, save/load, errors."""
import copy
import re

import pytest
import torch

from qstar_ds.config import ConfigError, ThoughtConfig
from qstar_ds.layout import Layout
from qstar_ds.learn import learn_pass
from qstar_ds.model import EOT_TOKEN, INIT_TEXT, SOT_TOKEN, QuietStarModel, load_tokenizer
from qstar_ds.tiny import tiny_causal_lm, tiny_tokenizer

from conftest import make_model, random_batch, random_thoughts
from helpers import assert_equal


@pytest.mark.parametrize("tie,init", [(False, None), (True, None), (True, " \u2014")])
def test_thought_tokens_added_and_initialised_from_dashes(tie, init):
    tok = tiny_tokenizer()
    base = tiny_causal_lm("llama", len(tok), tie=tie)
    n_before = len(tok)
    dash = tok.encode(init or INIT_TEXT, add_special_tokens=False)[0]
    assert init is None or dash != tok.encode(INIT_TEXT, add_special_tokens=False)[0]
    model = QuietStarModel.from_base(base, tok, *([init] if init else []))
    assert len(tok) == n_before + 2
    assert tok.convert_tokens_to_ids([SOT_TOKEN, EOT_TOKEN]) == [model.sot_id, model.eot_id]
    assert tok.encode(f"a{SOT_TOKEN}b{EOT_TOKEN}", add_special_tokens=False).count(model.sot_id) == 1
    emb = base.get_input_embeddings().weight
    out = base.get_output_embeddings().weight
    assert emb.shape[0] == n_before + 2 and out.shape[0] == n_before + 2
    assert (out is emb) == tie
    for w in (emb, out):
        assert_equal(w[model.sot_id], w[dash], "<sot> row")
        assert_equal(w[model.eot_id], w[dash], "<eot> row")
    assert_equal(model.thought_embeds, emb[[dash, dash]], "model.thought_embeds, emb[[dash")
    last = model.mixing_head.net[-1]
    assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(last.bias) == 0
    # wrapping twice (e.g. a loaded tokenizer) does not add the tokens again
    assert tok.convert_tokens_to_ids(SOT_TOKEN) == model.sot_id
    QuietStarModel.from_base(tiny_causal_lm("llama", len(tok)), tok)
    assert len(tok) == n_before + 2


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_at_initialisation_mixed_equals_base(arch):
    tok = tiny_tokenizer()
    base = tiny_causal_lm(arch, len(tok), dtype=torch.float64)
    plain = copy.deepcopy(base)                   # the unmodified HF model, without the markers
    model = QuietStarModel.from_base(base, tok)
    cfg = ThoughtConfig(thought_len=2, n_thoughts=2, talk_len=3)
    x, am = random_batch(9, 2, len(tok) - 2, None)
    anchor = torch.arange(6).repeat_interleave(2)[None].expand(2, -1)
    out = learn_pass(model, cfg, x, am, anchor, random_thoughts(2, 12, 2, len(tok) - 2))
    assert torch.count_nonzero(out.mix_w) == 0
    # mixed log-prob of x_{i+j} == base log-prob of x_{i+j} at base position i+j-1, bit for bit
    idx = anchor[..., None] + torch.arange(3)                                  # (B, M, K)
    base_at = out.base_logp.gather(1, idx.flatten(1)).view(idx.shape)
    torch.testing.assert_close(out.talk_logp, base_at, rtol=0, atol=1e-13)
    with torch.no_grad():
        h = model.hidden(x, Layout.base_only(am.bool()))
        hb = h.gather(1, idx.flatten(1)[..., None].expand(-1, -1, h.shape[-1])).view(*idx.shape, -1)
        mixed, w = model.mix(hb, hb + 1.0)
        assert_equal(mixed, hb, "mixed")                                           # exactly the base state
        # and equal to the plain HF model's log-probs (its vocabulary has no markers)
        ref = torch.log_softmax(plain(input_ids=x).logits, -1)[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.base_logp, ref, rtol=0, atol=1e-12)


def test_plain_hf_calls_behave_like_sdpa():
    tok = tiny_tokenizer()
    base = tiny_causal_lm("qwen2", len(tok), dtype=torch.float64)
    model = QuietStarModel.from_base(base, tok)
    plain = copy.deepcopy(base)
    plain.set_attn_implementation("sdpa")
    x, am = random_batch(7, 2, len(tok) - 2, "both")
    assert model.base.config._attn_implementation == "qstar"
    torch.testing.assert_close(model.base(input_ids=x, attention_mask=am).logits,
                               plain(input_ids=x, attention_mask=am).logits, rtol=0, atol=1e-12)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model, tok = make_model("mistral", dtype=torch.float32, seed=3)
    with torch.no_grad():  # "trained" values that differ from the "---" initialisation
        model.thought_embeds.mul_(1.5)
    model.save_pretrained(str(tmp_path), tokenizer=tok)
    loaded = QuietStarModel.from_pretrained(str(tmp_path))
    tok2 = load_tokenizer(str(tmp_path))
    assert (loaded.sot_id, loaded.eot_id) == (model.sot_id, model.eot_id)
    assert tok2.convert_tokens_to_ids([SOT_TOKEN, EOT_TOKEN]) == [model.sot_id, model.eot_id]
    assert len(tok2) == len(tok)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.count_nonzero(loaded.mixing_head.net[-1].weight) > 0      # not re-initialised
    emb = loaded.base.get_input_embeddings().weight
    assert_equal(emb[[loaded.sot_id, loaded.eot_id]], model.thought_embeds, "emb[[loaded.sot_id, loaded.eot_id]]")


def test_probability_mixing_rule_round_trips_and_its_two_forms_agree(tmp_path):
    """model.mix_rule=prob: the whole mixed distribution (generation, answer scoring) and the
    target log-probs (learn pass, chunked or not) are the same mixture; save/load keeps the rule;
    mix() (the hidden-state rule) refuses; bad rules and weights are refused by name."""
    model, tok = make_model("llama", dtype=torch.float64, seed=2)
    model.set_mix_rule("prob", 0.2)
    g = torch.Generator().manual_seed(0)
    hb, ht = torch.randn(2, 5, 32, generator=g, dtype=torch.float64).unbind(0)
    targets = torch.randint(0, len(tok) - 2, (5,), generator=g)
    z, w = model.mixed_logits(hb, ht)
    want = torch.log_softmax(z, -1).gather(-1, targets[:, None])[:, 0]
    for chunk in (0, 2):
        got, w2 = model.mixed_token_logprobs(hb, ht, targets, chunk)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(w2, w, rtol=0, atol=0)
    torch.testing.assert_close(torch.logsumexp(z, -1), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool(((w > 0) & (w < 1)).all()) and bool(torch.isinf(z[:, [model.sot_id, model.eot_id]]).all())
    with pytest.raises(ValueError, match="hidden-state rule"):
        model.mix(hb, ht)
    model.save_pretrained(str(tmp_path), tokenizer=tok)
    loaded = QuietStarModel.from_pretrained(str(tmp_path)).double()
    assert (loaded.mix_rule, loaded.mix_init, loaded.mix_spec) == ("prob", 0.2, "prob:0.2")
    assert_equal(loaded.mixed_logits(hb, ht)[0], z, "mixed logits after a round trip")
    for rule, init, match in (("logits", 0.1, "mix_rule='logits'"), ("prob", 1.0, "mix_init=1.0")):
        with pytest.raises(ValueError, match=re.escape(match)):
            model.set_mix_rule(rule, init)


def test_a_resume_that_changes_the_mixing_rule_is_refused():
    from qstar_ds.checkpoint import CheckpointError, check_compatible
    old = {"signature": {"thought_len": 2}}                   # written before the rule was recorded
    check_compatible(old, {"thought_len": 2, "mix": "hidden"}, "ckpt")
    with pytest.raises(CheckpointError, match=re.escape("mix: 'hidden' -> 'prob:0.01'")):
        check_compatible(old, {"thought_len": 2, "mix": "prob:0.01"}, "ckpt")
    with pytest.raises(CheckpointError, match=re.escape("mix: 'prob:0.01' -> 'prob:0.05'")):
        check_compatible({"signature": {"mix": "prob:0.01"}}, {"mix": "prob:0.05"}, "ckpt")


def test_an_exported_directory_is_read_from_safetensors_only(tmp_path):
    """A pickled weights file planted next to (or instead of) the safetensors never runs."""
    import os

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "payload_ran"),))

    model, tok = make_model("llama", dtype=torch.float32)
    path = tmp_path / "m"
    model.save_pretrained(str(path), tokenizer=tok)
    torch.save({"x": Payload()}, path / "pytorch_model.bin")
    QuietStarModel.from_pretrained(str(path))                        # the safetensors are used
    (path / "model.safetensors").unlink()
    with pytest.raises(OSError):
        QuietStarModel.from_pretrained(str(path))                    # the pickle is not a fallback
    assert not (tmp_path / "payload_ran").exists()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="quiet_star.json"):
        QuietStarModel.from_pretrained(str(tmp_path))
    model, tok = make_model("llama", dtype=torch.float32)
    model.save_pretrained(str(tmp_path / "m"), tokenizer=tok)
    with pytest.raises(ValueError, match="startofthought"):
        load_tokenizer(str(tmp_path / "m"), tokens=type(model.tokens)(1, 2))


def test_sliding_window_shorter_than_layout_is_refused():
    tok = tiny_tokenizer()
    base = tiny_causal_lm("mistral", len(tok))
    base.config.sliding_window = 6
    model = QuietStarModel.from_base(base, tok)
    cfg = ThoughtConfig(thought_len=3, n_thoughts=1, talk_len=2)
    x, am = random_batch(8, 1, len(tok) - 2, None)
    with pytest.raises(ValueError, match="sliding_window=6"):
        learn_pass(model, cfg, x, am, torch.tensor([[4]]), random_thoughts(1, 1, 3, 10))


@pytest.mark.parametrize("key,value", [("thought_len", 0), ("n_thoughts", 0), ("talk_len", 0),
                                       ("temperature", 0.0), ("top_k", -1), ("beta", -1.0),
                                       ("attention_backend", "nope"), ("temperature", float("inf")),
                                       ("temperature", 1e-45), ("reinforce_temperature", float("nan")),
                                       ("beta", float("inf")), ("mode", "nope"), ("mixing_lr_mult", -1.0)])
def test_bad_config_names_key_and_value(key, value):
    with pytest.raises(ConfigError, match=f"^{key}={value!r}"):
        ThoughtConfig(**{key: value})


@pytest.mark.parametrize("cls,key,value", [
    ("OptimConfig", "lr", float("inf")), ("OptimConfig", "eps", -1e-8), ("OptimConfig", "weight_decay", -0.1),
    ("OptimConfig", "betas", (0.9, 1.0)), ("OptimConfig", "betas", (-0.1, 0.99)), ("OptimConfig", "grad_clip", float("nan")),
    ("EvalConfig", "temperature", 0.0), ("EvalConfig", "holdout_fraction", 1.0), ("EvalConfig", "sequences", 0),
    ("ModelConfig", "mix_rule", "logits"), ("ModelConfig", "mix_init", 0.0), ("ModelConfig", "mix_init", float("nan"))])
def test_values_that_make_the_math_non_finite_are_refused(cls, key, value):
    import qstar_ds.config as config
    prefix = {"OptimConfig": "optim", "EvalConfig": "eval", "ModelConfig": "model"}[cls]
    with pytest.raises(ConfigError, match="^" + re.escape(f"{prefix}.{key}={value!r}")):
        getattr(config, cls)(**{key: value})


def test_parameter_groups_cover_everything_once():
    model, _ = make_model("llama", dtype=torch.float32)
    groups = model.parameter_groups(lr=1e-3, weight_decay=0.1, thought_lr_mult=100.0)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    th = next(g for g in groups if g["name"] == "thought_embeds")
    assert th["params"] == [model.thought_embeds] and th["lr"] == pytest.approx(0.1) and th["weight_decay"] == 0
    no_decay = next(g for g in groups if g["name"] == "no_decay")
    norm = model.base.model.norm.weight
    assert any(p is norm for p in no_decay["params"])
