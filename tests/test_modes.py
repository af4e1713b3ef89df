"""The baselines of the learning experiment in the real trainer (2-rank ZeRO-3 on CPU, SGD so
that an update is the gradient, see test_trainer.py): thought.mode=off is a plain causal-LM step,
thought.mode=filler feeds exactly the filler thoughts and equals the learn pass on them,
thought.mode=oracle feeds the text's own continuation where its pattern marks the next token,
thought.mode=teacher feeds the units step where the context asks for a sum and makes it the
policy's target; the held-out evaluation does not depend on the number of ranks."""
import json

import pytest
import torch

from qstar_ds.cli import make_config
from qstar_ds.data import SequenceStream
from qstar_ds.ds_config import lr_lambda
from qstar_ds.hub import build_base
from qstar_ds.learn import learn_pass
from qstar_ds.model import QuietStarModel, filler_token_id
from qstar_ds.rollout import default_positions

from helpers import COMMON, assert_equal, assert_same_update, run_worker


def setup(overrides: dict, init: dict):
    """(config, QuietStarModel loaded with `init`, tokenizer, the trainer's data stream)."""
    cfg = make_config("debug_cpu", None, {**COMMON, **overrides})
    base, tok = build_base(cfg.model.name, torch.float32, None, cfg.train.seed)
    vocab = base.get_input_embeddings().weight.shape[0]
    model = QuietStarModel.from_base(base, tok)
    model.load_state_dict(init)
    d = cfg.data
    stream = SequenceStream(tok, d.source, d.seq_len, d.pack, d.split, d.text_field, d.subset, d.seed,
                            holdout=cfg.eval.holdout_fraction)
    return cfg, model, tok, stream, vocab


def fixed_mode_run(tmp_path, name: str, over: dict):
    """A 2-rank ZeRO-3 run with `over` (filler " ..."), and what checking it needs: (worker dump,
    config, the model at the run's init, tokenizer, the run's data stream, the filler token, the
    token ids of every learn micro-step on rank 0)."""
    two = run_worker(tmp_path, name, 2, over)
    cfg, model, tok, stream, _ = setup(over, two["init"])
    learn_calls = [ids for ids in two["fed"] if ids.shape[-1] > cfg.data.seq_len]
    assert learn_calls, "no learn micro-step was recorded"
    return two, cfg, model, tok, stream, filler_token_id(tok, " ..."), learn_calls


def fixed_thought_reference(cfg, model, stream, thoughts_of, rewards_of=None) -> dict:
    """The run's steps in one process without DeepSpeed: the learn pass with every position
    thinking `thoughts_of(x, anchor)` (B, M, t), rewarded `rewards_of(x, anchor)` (B, M) (default
    0), torch SGD and the run's schedule -> the final parameters."""
    groups = model.parameter_groups(cfg.optim.lr, 0.0, cfg.thought.thought_lr_mult, cfg.thought.mixing_lr_mult)
    opt = torch.optim.SGD(groups, lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    n = cfg.data.seq_len
    for _ in range(cfg.train.max_steps):
        x, am = stream.next_batch(cfg.train.batch_size)
        anchor = default_positions(n, cfg.thought.talk_len).repeat_interleave(cfg.thought.n_thoughts)[None]
        anchor = anchor.expand(x.shape[0], -1)
        rewards = torch.zeros(anchor.shape) if rewards_of is None else rewards_of(x, anchor)
        out = learn_pass(model, cfg.thought, x, am, anchor, thoughts_of(x, anchor), rewards=rewards)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def test_off_mode_is_a_plain_causal_lm_step(tmp_path):
    """thought.mode=off under 2-rank ZeRO-3 == the plain HF model (without the two marker rows)
    trained with its own `labels=` loss and torch SGD; the thought parts do not move."""
    two = run_worker(tmp_path, "off", 2, {"thought.mode": "off"})
    cfg, model, tok, stream, vocab = setup({"thought.mode": "off"}, two["init"])
    plain = model.base
    plain.resize_token_embeddings(vocab)                    # drop <sot>/<eot>: an ordinary causal LM
    assert plain.get_input_embeddings().weight.shape[0] == vocab
    opt = torch.optim.SGD(plain.parameters(), lr=cfg.optim.lr)
    for _ in range(cfg.train.max_steps):
        x, _ = stream.next_batch(cfg.train.batch_size)
        opt.zero_grad()
        plain(input_ids=x, labels=x).loss.backward()
        opt.step()
    ref = {"base." + k: v.detach() for k, v in plain.named_parameters()}
    init = {k: v for k, v in two["init"].items() if k in ref}
    ours = {k: v[:ref[k].shape[0]] if v.shape != ref[k].shape else v for k, v in two["final"].items() if k in ref}
    init = {k: v[:ref[k].shape[0]] if v.shape != ref[k].shape else v for k, v in init.items()}
    assert_same_update(init, ours, ref)
    for k, v in two["final"].items():
        if k.startswith(("mixing_head.", "thought_embedding.")):
            assert_equal(v, two["init"][k], f"{k} (must not move in off mode)")
    assert two["metrics"]["loss_talk"] == 0 and two["metrics"]["loss_reinforce"] == 0


def test_filler_mode_feeds_the_filler_and_equals_the_learn_pass_on_it(tmp_path):
    two, cfg, model, tok, stream, filler, learn_calls = fixed_mode_run(
        tmp_path, "filler", {"thought.mode": "filler", "thought.filler": " ..."})
    t, L, n = cfg.thought.thought_len, cfg.thought.stream_len, cfg.data.seq_len
    for ids in learn_calls:
        streams = ids[0, n:].view(-1, L)                                    # (streams, L)
        assert (streams[:, 0] == model.sot_id).all() and (streams[:, t + 1] == model.eot_id).all()
        bad = (streams[:, 1:t + 1] != filler).nonzero()
        assert bad.numel() == 0, f"non-filler thought tokens at (stream, slot) {bad[:5].tolist()}"
    # the same two steps, one process, no DeepSpeed: the learn pass on filler thoughts, reward 0
    ref = fixed_thought_reference(cfg, model, stream, lambda x, anchor: torch.full((*anchor.shape, t), filler))
    assert_same_update(two["init"], two["final"], ref)
    assert two["metrics"]["loss_reinforce"] == 0


def oracle_reference(x: torch.Tensor, tok, anchor: torch.Tensor, t: int, filler: int, pattern: str) -> torch.Tensor:
    """Oracle thoughts by a loop over (sequence, stream): x_{i+1..i+t} (filler past the end) where
    the next token's text overlaps a match of `pattern`, the filler elsewhere."""
    from qstar_ds.heldout import token_focus
    marked = token_focus(x, tok, pattern)
    out = torch.full((*anchor.shape, t), filler)
    for b in range(x.shape[0]):
        for m, i in enumerate(anchor[b].tolist()):
            if i + 1 < x.shape[1] and marked[b, i + 1]:
                row = x[b, i + 1:i + 1 + t].tolist()
                out[b, m] = torch.tensor(row + [filler] * (t - len(row)))
    return out


def evaluate_scores_it_like_the_trainer(tmp_path, name: str, two: dict, thoughts: str, refusal: str,
                                        extra: tuple | list = ()) -> None:
    """evaluate.py --nll_heldout on run `name`'s checkpoint reports `thoughts` and gives the
    trainer's final per-sequence NLLs with thoughts; a generation task with thoughts is refused in
    one line that says `refusal`."""
    import subprocess
    import sys
    record = json.loads((tmp_path / name / "eval" / "step_00000002.json").read_text())
    out = tmp_path / "e.json"
    res = subprocess.run([sys.executable, "-m", "qstar_ds.evaluate", "--model", str(tmp_path / name), "--tasks",
                          "nll", "--nll_heldout", "--talk_len", str(two["eval"]["talk_len"]), "--batch_size", "1",
                          *extra, "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())["nll"]
    assert got["thoughts"] == thoughts
    assert got["sequence_nll_thoughts"] == pytest.approx(record["sequence_nll_thoughts"], rel=1e-5)
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    res = subprocess.run([sys.executable, "-m", "qstar_ds.evaluate", "--model", str(tmp_path / name), "--tasks",
                          "gsm8k", "--data", f"gsm8k={gsm}", "--output", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 2 and refusal in res.stderr and "Traceback" not in res.stderr


def test_oracle_mode_feeds_the_truth_where_marked_and_equals_the_learn_pass_on_it(tmp_path):
    """thought.mode=oracle under 2-rank ZeRO-3: the streams carry the text's continuation after
    the positions whose next token is a digit and the filler elsewhere, the update equals the
    one-process learn pass on thoughts built by a loop (reward 0), and evaluate.py scores the
    checkpoint with the same thoughts as the trainer's own held-out evaluation."""
    two, cfg, model, tok, stream, filler, learn_calls = fixed_mode_run(
        tmp_path, "oracle", {"thought.mode": "oracle", "thought.oracle_focus": r"\d", "thought.filler": " ...",
                             "eval.sequences": 4, "eval.batch_size": 2, "train.save_every": 2})
    t, L, n = cfg.thought.thought_len, cfg.thought.stream_len, cfg.data.seq_len
    truths = 0
    for ids in learn_calls:
        x = ids[0, :n].tolist()
        for th in ids[0, n:].view(-1, L)[:, 1:t + 1].tolist():
            if th != [filler] * t:
                truths += 1
                assert any(x[i + 1:i + 1 + t] + [filler] * (t - len(x[i + 1:i + 1 + t])) == th for i in range(n - 1))
    assert truths > 0, "no stream carried the text's continuation"
    ref = fixed_thought_reference(cfg, model, stream, lambda x, anchor: oracle_reference(x, tok, anchor, t, filler, r"\d"))
    assert_same_update(two["init"], two["final"], ref)
    assert two["metrics"]["loss_reinforce"] == 0
    evaluate_scores_it_like_the_trainer(tmp_path, "oracle", two, "oracle", "oracle thoughts")


def test_teacher_mode_feeds_the_step_rewards_it_and_equals_the_learn_pass_on_it(tmp_path):
    """thought.mode=teacher under 2-rank ZeRO-3: the streams carry the units step where the context
    asks for a sum and the filler elsewhere, the update equals the one-process learn pass on those
    thoughts with reward 1 on the steps (the REINFORCE term is their NLL), the trainer's held-out
    evaluation samples only there, and evaluate.py scores the checkpoint the same way (greedy
    thoughts, so that both draw the same) and refuses generation tasks with thoughts, one line."""
    from qstar_ds.teacher import teacher_thoughts
    over = {"thought.mode": "teacher", "thought.thought_len": 6, "thought.filler": " ...", "eval.sequences": 4,
            "eval.batch_size": 2, "eval.temperature": 1e-6, "train.save_every": 2, "data.seq_len": 64}
    two, cfg, model, tok, stream, filler, learn_calls = fixed_mode_run(tmp_path, "teacher", over)
    t, L, n = cfg.thought.thought_len, cfg.thought.stream_len, cfg.data.seq_len
    steps = 0
    for ids in learn_calls:               # a learn micro-step holds some streams of one sequence
        x = ids[:, :n]
        every, on = teacher_thoughts(x, torch.ones_like(x), torch.arange(n)[None], tok, t, filler)
        allowed = every[0].tolist()
        for th in ids[0, n:].view(-1, L)[:, 1:t + 1].tolist():
            assert th in allowed, tok.decode(th)
            steps += th != [filler] * t
    assert steps > 0, "no stream carried a step"
    assert two["metrics"]["loss_reinforce"] > 0

    def thoughts_of(x, anchor):
        return teacher_thoughts(x, torch.ones_like(x), anchor, tok, t, filler)[0]

    def rewards_of(x, anchor):
        return teacher_thoughts(x, torch.ones_like(x), anchor, tok, t, filler)[1].float()
    ref = fixed_thought_reference(cfg, model, stream, thoughts_of, rewards_of)
    assert_same_update(two["init"], two["final"], ref)
    evaluate_scores_it_like_the_trainer(tmp_path, "teacher", two, "sampled where the context asks for a sum",
                                        "teacher thoughts", ["--thought_temperature", "1e-6"])


def test_heldout_eval_does_not_depend_on_the_rank_count(tmp_path):
    """Filler mode (no sampling): 1 and 2 ranks score the same held-out sequences in the same order
    (7 sequences: the ranks hold 4 and 3, one repeat dropped)."""
    over = {"thought.mode": "filler", "eval.sequences": 7, "eval.batch_size": 4}
    one = run_worker(tmp_path, "one", 1, over)
    two = run_worker(tmp_path, "two", 2, over)
    for key in ("nll_base", "nll_mixed", "gain", "gain_win", "gain_hard10", "mix_w"):
        assert two["eval"][key] == pytest.approx(one["eval"][key], rel=1e-5, abs=1e-7), key
    assert two["eval"]["sequences"] == one["eval"]["sequences"] == 7
    rec = [json.loads((tmp_path / name / "eval" / "step_00000002.json").read_text()) for name in ("one", "two")]
    assert rec[1]["sequence_nll_thoughts"] == pytest.approx(rec[0]["sequence_nll_thoughts"], rel=1e-5)
    assert rec[0]["summary"]["gain"] != 0, "a random mixing head must give a non-zero gain"


def test_evaluate_scores_a_checkpoint_on_its_runs_heldout_text(tmp_path):
    """python -m qstar_ds.evaluate --model RUN --tasks nll --nll_heldout scores the sequences the
    run's own evaluation scored: in filler mode (nothing sampled) the same numbers from the saved
    checkpoint as the trainer's last evaluation, and the same per-sequence NLLs in the same order
    (on one rank and on two, where the ranks score sequences 0, 2, 4 and 1, 3), so a checkpoint
    rescored by evaluate pairs with another run's evaluation sequence by sequence."""
    import subprocess
    import sys
    run = run_worker(tmp_path, "run", 1, {"thought.mode": "filler", "eval.sequences": 5, "eval.batch_size": 2,
                                          "train.save_every": 2, "eval.focus": r"\d"})
    record = json.loads((tmp_path / "run" / "eval" / "step_00000002.json").read_text())
    for nproc in (1, 2):
        out = tmp_path / f"r{nproc}.json"
        launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", "2"] if nproc == 2 else [])
        res = subprocess.run(launch + ["-m", "qstar_ds.evaluate", "--model", str(tmp_path / "run"), "--tasks", "nll",
                                       "--nll_heldout", "--talk_len", str(run["eval"]["talk_len"]), "--batch_size", "1",
                                       "--nll_focus", r"\d", "--output", str(out)], capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        got = json.loads(out.read_text())["nll"]
        # eval.focus: the trainer's numbers on the digits' tokens are evaluate --nll_focus's
        for key in ("gain", "gain_outside", "nll_base", "nll_mixed", "tokens", "tokens_outside"):
            assert got["focus"][key] == pytest.approx(run["eval"]["focus_" + key], rel=1e-5, abs=1e-7), (nproc, key)
        for key in ("base", "thoughts"):
            assert got["focus"][f"sequence_nll_{key}"] == pytest.approx(record[f"sequence_nll_{key}_focus"], rel=1e-5)
        assert got["sequences"] == run["eval"]["sequences"] == 5 and got["thoughts"] == "filler"
        for key in ("nll_base", "nll_mixed", "gain", "gain_win"):
            assert got[key] == pytest.approx(run["eval"][key], rel=1e-5, abs=1e-7), (nproc, key)
        for key in ("sequence_nll_base", "sequence_nll_thoughts", "sequence_nll_base_rest",
                    "sequence_nll_thoughts_rest"):
            assert len(got[key]) == 5 and got[key] == pytest.approx(record[key], rel=1e-5, abs=1e-7), (nproc, key)
    assert len(set(record["sequence_nll_thoughts"])) == 5, "the sequences must differ for the order to be tested"
    # a base model has no run, so no held-out text: one line before anything is loaded
    res = subprocess.run([sys.executable, "-m", "qstar_ds.evaluate", "--model", "tiny-llama", "--tasks", "nll",
                          "--nll_heldout"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "--nll_heldout: --model='tiny-llama' is not a training checkpoint" in res.stderr
