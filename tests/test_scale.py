"""Scaling out (2 CPU ranks, ZeRO-3 with every parameter partitioned): the rollout all-gathers
the model once per step instead of at each of its t + 2 forwards, with the same thoughts and the
same update."""
import json
import os

import torch

from helpers import ROOT, SGD_JSON, assert_equal, assert_same_update, launch, run_worker

WORKER = os.path.join(ROOT, "tests", "rollout_worker.py")


def test_rollout_gathers_the_model_once_with_the_same_thoughts(tmp_path):
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps(SGD_JSON))
    dump = tmp_path / "rollout.pt"
    launch([WORKER, str(dump), "--preset", "debug_cpu", "--ds_config", str(ds), "--output_dir", str(tmp_path / "o"),
            "--train.batch_size", "3"], nproc=2)
    d = torch.load(dump)
    held, before, params = d["bytes"]["held"], d["bytes"]["before"], d["param_bytes"]
    assert held <= 1.1 * params, (held, params)
    # before: 2 sequences per rank x (t + 2 = 4) forwards, less what DeepSpeed's cache reuses
    assert before >= 3 * params, (before, params)
    assert_equal(d["thoughts"]["held"], d["thoughts"]["before"], "d['thoughts']['held']")
    torch.testing.assert_close(d["rewards"]["held"], d["rewards"]["before"], rtol=1e-5, atol=1e-6)


def test_held_batched_rollout_gives_the_update_of_one_sequence_at_a_time(tmp_path):
    held = run_worker(tmp_path, "held", 2, {})
    alone = run_worker(tmp_path, "alone", 2, {"train.rollout_batch": 1, "train.rollout_gather": "never"})
    assert_same_update(held["init"], held["final"], alone["final"])


def test_more_ranks_than_sequences_split_the_rollout_by_positions_with_the_same_update(tmp_path):
    """batch 1 on 2 ranks: each rank rolls out half of the sequence's positions and learns half of
    its streams (no idle rank), and the update is the one-rank update."""
    one = run_worker(tmp_path, "one", 1, {"train.batch_size": 1})
    two = run_worker(tmp_path, "two", 2, {"train.batch_size": 1})
    assert_same_update(one["init"], one["final"], two["final"])


def test_the_paper_run_wastes_under_5_percent_of_micro_steps_at_8_64_and_512_gpus():
    from qstar_ds.cli import parse_args
    from qstar_ds.schedule import plan_step, rollout_units, units_of
    cfg, _ = parse_args(["--preset", "mistral7b_owm"])
    P = cfg.data.seq_len - cfg.thought.talk_len
    for world in (8, 64, 512):
        plan = plan_step(cfg, world)
        assert plan.wasted < 0.05, (world, plan)
        units = rollout_units(cfg.train.batch_size, P, world)
        slots = -(-len(units) // world) * world
        assert 1 - len(units) / slots < 0.05, (world, len(units))           # ranks without a rollout unit
        dealt = [u for q in range(world) for u in units_of(units, q, world)]
        assert sorted(set(dealt)) == sorted(units)                          # every unit dealt
        covered = {(s, p) for s, a, b in units for p in range(a, b)}
        assert covered == {(s, p) for s in range(cfg.train.batch_size) for p in range(P)}


def test_learn_chunks_are_dealt_once_each_and_every_rank_runs_as_many_micro_steps():
    from qstar_ds.cli import parse_args
    from qstar_ds.schedule import learn_share, plan_step
    cfg, _ = parse_args(["--preset", "mistral7b_owm"])
    for world in (1, 3, 8, 64, 100):
        plan = plan_step(cfg, world)
        shares = [learn_share(plan, q) for q in range(world)]
        assert {len(s) for s in shares} == {plan.grad_accum}, world
        real = [c for s in shares for c, w in s if w == 1.0]
        assert sorted(real) == sorted(plan.chunks()), world                 # each chunk once, weight 1
        assert all(w in (0.0, 1.0) for s in shares for _, w in s)
        assert sum(w == 0.0 for s in shares for _, w in s) == plan.grad_accum * world - plan.total_chunks


def test_evaluation_shards_come_back_in_sequence_order():
    from qstar_ds.schedule import eval_share, rank_major_order
    for count, world in ((7, 1), (7, 2), (7, 3), (2, 4), (16, 4), (1, 3)):
        shares = [eval_share(count, q, world) for q in range(world)]
        assert len({len(s) for s in shares}) == 1                           # same forwards on every rank
        assert sorted({i for s in shares for i in s}) == list(range(count))
        gathered = torch.tensor([i for s in shares for i in s])             # what gather_rows returns
        keep, order = rank_major_order(count, world)
        assert gathered[torch.tensor(keep)][torch.tensor(order)].tolist() == list(range(count)), (count, world)
