"""Layout tags, visibility and position ids against brute force."""
import itertools

import torch

from qstar_ds.layout import BASE, Layout, base_positions
from helpers import assert_equal


def brute_visible(lay: Layout) -> torch.Tensor:
    B, n = lay.base_valid.shape
    out = torch.zeros(B, len(lay.q_stream), len(lay.k_stream), dtype=torch.bool)
    for b, q, k in itertools.product(range(B), range(len(lay.q_stream)), range(len(lay.k_stream))):
        qs, qi, ks, ki = (int(lay.q_stream[q]), int(lay.q_idx[q]), int(lay.k_stream[k]), int(lay.k_idx[k]))
        if ks == BASE:
            limit = qi if qs == BASE else int(lay.anchor[b, qs])
            ok = bool(lay.base_valid[b, ki]) and ki <= limit
            ok = ok or (qs == BASE and ki == qi)     # a padding base query sees itself
        else:
            ok = ks == qs and ki <= qi
        out[b, q, k] = ok
    return out


def test_packed_visibility_matches_brute_force():
    valid = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    anchor = torch.tensor([[1, 1, 3], [0, 2, 5]])
    lay = Layout.packed(valid, anchor, stream_len=3)
    assert lay.visible().shape == (2, 6 + 9, 6 + 9)
    assert_equal(lay.visible(), brute_visible(lay), "lay.visible()")


def test_rollout_steps_match_brute_force_and_packed_order():
    valid = torch.tensor([[1, 1, 1, 1, 1]], dtype=torch.bool)
    anchor = torch.tensor([[0, 2, 4]])
    lay = Layout.base_only(valid).with_streams(anchor)
    for s, m in [(0, 1), (1, 1), (2, 3)]:
        lay = lay.extend(s, m)
        assert_equal(lay.visible(), brute_visible(lay), "lay.visible()")
    # the keys of the step-major cache are a permutation of the packed stream-major keys
    packed = Layout.packed(valid, anchor, stream_len=5)
    step_tags = sorted(zip(lay.k_stream.tolist(), lay.k_idx.tolist()))
    assert step_tags == sorted(zip(packed.k_stream.tolist(), packed.k_idx.tolist()))


def test_position_ids_follow_plain_sequence():
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert base_positions(valid).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    anchor = torch.tensor([[3], [1]])
    lay = Layout.packed(valid, anchor, stream_len=4)
    pos = lay.position_ids()
    # row 0: anchor x_3 sits at 1 -> stream tokens at 2..5; row 1: anchor at 1 -> 2..5
    assert pos[0].tolist() == [0, 0, 0, 1, 2, 2, 3, 4, 5]
    assert pos[1].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5]


def test_talk_at_restarts_the_talk_part_after_the_anchor():
    """talk_at = k: stream tokens from index k on sit at p(anchor) + 1 + (s - k); the packed
    layout and the step-by-step (rollout) layout agree token by token."""
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    anchor = torch.tensor([[3], [1]])
    lay = Layout.packed(valid, anchor, stream_len=6, talk_at=3)     # <sot> c1 c2 <eot> x x
    pos = lay.position_ids()
    # row 0: anchor at position 1 -> <sot> c1 c2 at 2, 3, 4, then <eot> x x at 2, 3, 4
    assert pos[0].tolist() == [0, 0, 0, 1, 2, 2, 3, 4, 2, 3, 4]
    assert pos[1].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 2, 3, 4]
    plain = Layout.packed(valid, anchor, stream_len=6).position_ids()
    assert plain[0, 5:].tolist() == [2, 3, 4, 5, 6, 7]
    steps = Layout.base_only(valid).with_streams(anchor, talk_at=3)
    got = {}
    for s, m in [(0, 1), (1, 1), (2, 4)]:
        steps = steps.extend(s, m)
        for q, (st, i) in enumerate(zip(steps.q_stream.tolist(), steps.q_idx.tolist())):
            got[(st, i)] = steps.position_ids()[:, q].tolist()
    want = {(st, i): pos[:, q].tolist() for q, (st, i) in enumerate(zip(lay.q_stream.tolist(), lay.q_idx.tolist()))
            if st != BASE}
    assert got == want


def test_additive_mask_is_zero_or_min():
    valid = torch.ones(1, 4, dtype=torch.bool)
    lay = Layout.packed(valid, torch.tensor([[1]]), stream_len=2)
    m = lay.additive_mask(torch.float32)
    assert m.shape == (1, 1, 6, 6)
    vis = lay.visible()[:, None]
    assert torch.all(m[vis] == 0) and torch.all(m[~vis] == torch.finfo(torch.float32).min)
