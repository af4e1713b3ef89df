"""The DeepSpeed trainer under ZeRO-3 on CPU (gloo), 1 and 2 ranks: equality with a one-process
run of the core learn pass, invariance to rank count and chunk size, and the optimizer plumbing.

Optimizer: plain SGD (lr 0.05, no momentum, no weight decay) so that a parameter update is the
(clipped) gradient itself: Adam's first steps are ~lr * sign(grad) and would hide wrong gradients.
The mixing head starts random (not zero) so that thoughts, rewards and REINFORCE matter from the
first step and every parameter gets a real gradient. Two optimizer steps (the second one sees the
first one's update). No clipping (it would hide a wrong gradient scale) except where a test
checks clipping itself. float32 (DeepSpeed's ZeRO optimizer keeps float32 master weights).
Tolerance: per tensor, |ours - reference| <= 1e-3 * max|update| + 4 float32 ulps of the
parameter's magnitude (p + update is rounded at ulp(p)).
"""
import re

import pytest
import torch

from qstar_ds.cli import make_config
from qstar_ds.data import SequenceStream
from qstar_ds.ds_config import lr_lambda
from qstar_ds.hub import build_base
from qstar_ds.learn import learn_pass
from qstar_ds.model import QuietStarModel
from qstar_ds.rollout import rollout, sequence_noise, step_positions

from helpers import COMMON, assert_same_update, run_worker


def reference_run(init: dict, overrides: dict) -> dict:
    """The same training, one process, no DeepSpeed: full-batch learn pass, torch SGD."""
    cfg = make_config("debug_cpu", None, {**COMMON, **overrides})
    base, tok = build_base(cfg.model.name, torch.float32, None, cfg.train.seed)
    model = QuietStarModel.from_base(base, tok, mix_rule=cfg.model.mix_rule, mix_init=cfg.model.mix_init)
    model.load_state_dict(init)
    groups = model.parameter_groups(cfg.optim.lr, 0.0, cfg.thought.thought_lr_mult, cfg.thought.mixing_lr_mult)
    opt = torch.optim.SGD(groups, lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    d = cfg.data
    stream = SequenceStream(tok, d.source, d.seq_len, d.pack, d.split, d.text_field, d.subset, d.seed,
                            holdout=cfg.eval.holdout_fraction)      # the trainer never reads the held-out split
    for step in range(cfg.train.max_steps):
        x, am = stream.next_batch(cfg.train.batch_size)
        def marked(pattern):                # [sequence][token]: the token's own text matches (none across tokens)
            return [[bool(re.search(pattern, tok.decode(x[s, :j + 1])[len(tok.decode(x[s, :j])):]))
                     for j in range(x.shape[1])] for s in range(x.shape[0])]
        prefer = None
        if cfg.thought.position_focus:      # positions before a marked token of any sequence of the batch
            m = marked(cfg.thought.position_focus)
            prefer = torch.tensor([any(ms[i + 1] for ms in m) for i in range(x.shape[1] - cfg.thought.talk_len)])
        pos = step_positions(x.shape[1], cfg.thought.talk_len, cfg.thought.positions, cfg.train.seed, step,
                             prefer=prefer)
        ros = [rollout(model, cfg.thought, x[s:s + 1], am[s:s + 1], pos,
                       sequence_noise(cfg.train.seed, step, [s], "cpu")) for s in range(x.shape[0])]
        thoughts = torch.cat([r.thoughts for r in ros])
        rewards = torch.cat([r.rewards for r in ros])
        anchor = torch.cat([r.anchor for r in ros])
        if cfg.thought.reinforce_focus:     # REINFORCE only where the next token is marked
            m = marked(cfg.thought.reinforce_focus)
            rewards = torch.stack([torch.stack([rewards[s, k] if m[s][int(anchor[s, k]) + 1] else torch.zeros(())
                                                for k in range(anchor.shape[1])]) for s in range(x.shape[0])])
        out = learn_pass(model, cfg.thought, x, am, anchor, thoughts, rewards=rewards)
        opt.zero_grad()
        out.loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, out


def test_two_ranks_zero3_equal_one_process_reference(tmp_path):
    # with the non-default marker init and talk positions (the defaults run in every other test)
    two = run_worker(tmp_path, "two", 2, {"model.thought_init": " \u2014", "thought.talk_positions": "resume"})
    ref, out = reference_run(two["init"], {"thought.talk_positions": "resume"})
    assert out.losses["reinforce"].abs() > 0, "step 2 must carry a REINFORCE gradient"
    # model.thought_init reached both markers: each starts as the embedding of the first token of " \u2014"
    tok = build_base("tiny-llama", torch.float32, None, 0)[1]
    first = tok.encode(" \u2014", add_special_tokens=False)[0]
    emb = two["init"]["base.model.embed_tokens.weight"]
    assert torch.equal(two["init"]["thought_embedding.weight"], emb[[first, first]])
    assert_same_update(two["init"], two["final"], ref)
    assert two["metrics"]["loss"] == pytest.approx(out.loss.item(), rel=1e-5)


def test_rank_count_and_chunk_size_do_not_change_the_update(tmp_path):
    # batch 2: 2 ranks x 1 micro-step each (one chunk per sequence) vs 1 rank x 2 micro-steps
    two = run_worker(tmp_path, "two", 2, {"train.batch_size": 2, "train.chunk_tokens": 1000})
    one = run_worker(tmp_path, "one", 1, {"train.batch_size": 2, "train.chunk_tokens": 1000})
    assert two["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-6)
    assert_same_update(one["init"], two["final"], one["final"])
    # small chunks (4 streams each) vs one chunk per sequence, with global-norm clipping on
    small = run_worker(tmp_path, "small", 1, {"train.batch_size": 2, "train.chunk_tokens": 40,
                                              "optim.grad_clip": 1.0})
    large = run_worker(tmp_path, "large", 1, {"train.batch_size": 2, "train.chunk_tokens": 1000,
                                              "optim.grad_clip": 1.0})
    assert small["metrics"]["grad_norm"] > 1.0, "clipping must be active for this comparison"
    assert_same_update(large["init"], small["final"], large["final"])


def test_fast_paths_under_two_rank_zero3_equal_the_dense_reference(tmp_path):
    """The split attention backend and the vocabulary-chunked loss (whose output weight ZeRO-3
    gathers as an external parameter), 2 ranks, against the one-process dense, unchunked run."""
    fast = {"thought.attention_backend": "split", "thought.loss_chunk_tokens": 16}
    two = run_worker(tmp_path, "fast", 2, fast)
    ref, out = reference_run(two["init"], {})
    assert_same_update(two["init"], two["final"], ref)
    assert two["metrics"]["loss"] == pytest.approx(out.loss.item(), rel=1e-5)


def test_thinking_at_a_subset_of_positions_under_two_rank_zero3_equals_the_reference(tmp_path):
    """thought.positions = 5 of 22: each step thinks after its own 5 positions (a new draw per
    step), and batch 1 on 2 ranks splits those positions' rollout and streams between the ranks."""
    sub = {"thought.positions": 5, "train.batch_size": 1}
    two = run_worker(tmp_path, "sub", 2, sub)
    ref, out = reference_run(two["init"], sub)
    assert out.valid.shape[1] == 5 * 2                     # the reference's last step: 5 positions x r
    assert out.losses["reinforce"].abs() > 0
    assert_same_update(two["init"], two["final"], ref)
    assert two["metrics"]["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    every, _ = reference_run(two["init"], {"train.batch_size": 1})
    assert any((every[k] - ref[k]).abs().max() > 1e-4 for k in ref), "a subset must change the update"


def test_thinking_before_marked_tokens_under_two_rank_zero3_equals_the_reference(tmp_path):
    """thought.position_focus '\\d' with 4 of 22 positions: every rank prefers the positions before
    a digit of any sequence of the batch (batch 2 on 2 ranks: each rolls out one sequence), as
    the one-process reference computes them from each token's own text."""
    focus = {"thought.positions": 4, "thought.position_focus": r"\d", "train.batch_size": 2}
    two = run_worker(tmp_path, "focus", 2, focus)
    ref, out = reference_run(two["init"], focus)
    assert out.valid.shape[1] == 4 * 2 and out.losses["reinforce"].abs() > 0
    assert_same_update(two["init"], two["final"], ref)
    assert two["metrics"]["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert two["metrics"]["think_focus_positions"] == 4          # the built-in corpus has digits everywhere
    drawn, _ = reference_run(two["init"], {"thought.positions": 4, "train.batch_size": 2})
    assert any((drawn[k] - ref[k]).abs().max() > 1e-4 for k in ref), "the preference must change the update"


def test_reinforce_before_marked_tokens_only_under_two_rank_zero3_equals_the_reference(tmp_path):
    """thought.reinforce_focus '\\d': the REINFORCE term trains only the streams whose next token
    is a digit (the others' rewards set to 0), the talk and base losses everywhere; batch 2 on 2
    ranks against the one-process reference that marks each token from its own text."""
    focus = {"thought.positions": 6, "thought.reinforce_focus": r"\d", "train.batch_size": 2}
    two = run_worker(tmp_path, "reinforce_focus", 2, focus)
    ref, out = reference_run(two["init"], focus)
    assert 0 < two["metrics"]["reinforce_focus_frac"] < 1               # digits and other tokens
    assert out.losses["reinforce"].abs() > 0
    assert_same_update(two["init"], two["final"], ref)
    assert two["metrics"]["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    everywhere, _ = reference_run(two["init"], {"thought.positions": 6, "train.batch_size": 2})
    assert any((everywhere[k] - ref[k]).abs().max() > 1e-4 for k in ref), "the focus must change the update"


def test_read_loss_and_read_rewards_under_two_rank_zero3_equal_the_reference(tmp_path):
    """thought.w_read (the post-thought states' own NLL) and thought.reward = read, 2 ranks, with
    the fast paths on, against the one-process dense run."""
    read = {"thought.w_read": 0.7, "thought.reward": "read"}
    two = run_worker(tmp_path, "read", 2, {**read, "thought.attention_backend": "split",
                                           "thought.loss_chunk_tokens": 16})
    ref, out = reference_run(two["init"], read)
    assert out.losses["read"] > 0 and out.losses["reinforce"].abs() > 0
    assert_same_update(two["init"], two["final"], ref)
    assert two["metrics"]["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert two["metrics"]["loss_read"] == pytest.approx(out.losses["read"].item(), rel=1e-5)
    plain, _ = reference_run(two["init"], {})
    assert any((plain[k] - ref[k]).abs().max() > 1e-4 for k in ref), "the read loss must change the update"


def test_probability_mixing_under_two_rank_zero3_equals_the_reference(tmp_path):
    """model.mix_rule=prob (the mixture of the two next-token distributions), 2 ranks, fast paths
    on, against the one-process dense run."""
    prob = {"model.mix_rule": "prob", "model.mix_init": 0.2}
    two = run_worker(tmp_path, "prob", 2, {**prob, "thought.attention_backend": "split",
                                           "thought.loss_chunk_tokens": 16})
    ref, out = reference_run(two["init"], prob)
    assert out.losses["reinforce"].abs() > 0
    w = out.mix_w[out.valid]
    assert bool(((w > 0) & (w < 1)).all())
    assert_same_update(two["init"], two["final"], ref)
    assert two["metrics"]["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    hidden, _ = reference_run(two["init"], {})
    assert any((hidden[k] - ref[k]).abs().max() > 1e-4 for k in ref), "the rule must change the update"
