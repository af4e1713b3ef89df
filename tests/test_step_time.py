"""tools/step_time.py's model: its communication terms follow the ZeRO variant and the rollout
gathering, and its FLOP count matches a hand count (pure arithmetic, no device)."""
import dataclasses
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

from step_time import Rates, Shape, predict  # noqa: E402
from memory_estimate import KNOWN  # noqa: E402

from qstar_ds.cli import make_config  # noqa: E402


@pytest.fixture
def paper():
    return make_config("mistral7b_owm"), Shape.of(KNOWN["mistralai/Mistral-7B-v0.1"])


def test_one_device_has_no_communication(paper):
    cfg, shape = paper
    p = predict(cfg, shape, 1, 1, Rates())
    assert p["seconds"]["rollout_comm"] == p["seconds"]["learn_comm"] == p["seconds"]["optimizer_comm"] == 0
    assert p["step_s"] == pytest.approx(sum(p["seconds"].values()))


def test_gathering_at_every_rollout_forward_costs_t_plus_2_gathers(paper):
    cfg, shape = paper
    rates = dataclasses.replace(Rates(), latency=0.0)
    held = predict(cfg, shape, 8, 8, rates)["seconds"]["rollout_comm"]
    never = predict(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rollout_gather="never")),
                    shape, 8, 8, rates)["seconds"]["rollout_comm"]
    assert never == pytest.approx(held * (cfg.thought.thought_len + 2))      # one sequence per rank: one group


def test_zero2_gathers_nothing_in_the_rollout_and_hpz_keeps_micro_step_gathers_in_the_node(paper):
    cfg, shape = paper
    rates = Rates()
    z3, hpz, z2 = (predict(cfg, shape, 8, 8, rates, z)["seconds"] for z in ("3", "3+hpz", "2"))
    assert z2["rollout_comm"] == 0 and z2["learn_comm"] < z3["learn_comm"]
    assert hpz["learn_comm"] < z3["learn_comm"] and hpz["optimizer_comm"] > 0 == z3["optimizer_comm"]


def test_learn_flops_are_8_P_per_token_with_checkpointing_on_a_hand_count():
    cfg = make_config("smollm2", None, {"data.seq_len": 64, "thought.mode": "off"})
    shape = Shape(layers=2, hidden=8, vocab=10, params_compute=1000, params_total=1100)
    unit = Rates(learn_flops=1.0, rollout_flops=1.0, mem_bw=float("inf"), optimizer_params=float("inf"))
    p = predict(cfg, shape, 1, 1, unit)
    n, B = 64, cfg.train.batch_size
    attention = 4 * 2 * 8 * n * n / 2                      # 4 layers H keys per token, keys n / 2 on average
    assert p["seconds"]["learn"] == pytest.approx(B * 4 * (2 * 1000 * n + attention))
