"""Padding-free packing: the plan (best-fit decreasing) and the PackedBatch layout."""

import random

import pytest
import torch

from fastalign.data import IGNORE_INDEX, Sequence, pack, pack_all, plan_batches


def test_best_fit_decreasing_by_hand():
    # Sorted: 7(u1) 5(u3) 4(u0) 3(u2) 2(u4), budget 10.
    # 7 -> new A (room 3); 5 -> new B (room 5); 4 -> B is the fullest that fits (room 1);
    # 3 -> A (room 0); 2 -> no room anywhere -> new C.
    assert plan_batches([4, 7, 3, 5, 2], 10) == [[1, 2], [3, 0], [4]]


def test_plan_places_every_unit_once_within_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    plan = plan_batches(lengths, 512)
    placed = sorted(i for b in plan for i in b)
    assert placed == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 512 for b in plan)
    # Best-fit decreasing is near the bound: at most one batch more than 11/9 of optimal + 1.
    assert len(plan) <= 11 / 9 * (sum(lengths) / 512) + 2
    assert plan == plan_batches(lengths, 512)  # deterministic


def test_too_long_unit_names_it():
    with pytest.raises(ValueError, match="unit 2 has 600 tokens, more than max_tokens_per_batch=512"):
        plan_batches([10, 20, 600], 512)


def test_layout_labels_never_cross_a_boundary():
    batch = pack([[Sequence([11, 12, 13, 14], [False, False, True, True])], [Sequence([21, 22, 23])]])
    assert batch.input_ids.tolist() == [[11, 12, 13, 14, 21, 22, 23]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch.cu_seqlens.tolist() == [0, 4, 7] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 4
    assert batch.seq_index.tolist() == [0, 0, 0, 0, 1, 1, 1]
    # Sequence 0 predicts 13 and 14 (its loss tokens); its last token predicts nothing, so 21 is
    # never a target of sequence 0; sequence 1 (no mask) predicts 22 and 23.
    assert batch.labels.tolist() == [IGNORE_INDEX, 13, 14, IGNORE_INDEX, 22, 23, IGNORE_INDEX]
    assert batch.num_loss_tokens == 4 and batch.chosen is None


def test_pairs_stay_together_and_are_indexed():
    rng = random.Random(1)
    units = [[Sequence([p] * rng.randint(2, 9)), Sequence([p + 100] * rng.randint(2, 9))] for p in range(40)]
    batches = pack_all(units, 32)
    seen = set()
    for b in batches:
        assert b.num_tokens <= 32
        ids = b.input_ids[0]
        for c, r in zip(b.chosen.tolist(), b.rejected.tolist()):
            first = lambda s: int(ids[b.cu_seqlens[s]])  # noqa: E731
            assert first(r) == first(c) + 100  # the rejected half sits with its chosen half
            seen.add(first(c))
    assert seen == set(range(40))


def test_bad_sequences():
    with pytest.raises(ValueError, match="at least one token"):
        Sequence([])
    with pytest.raises(ValueError, match="loss_mask has 2 entries for 3 tokens"):
        Sequence([1, 2, 3], [True, False])
    with pytest.raises(ValueError, match="all be single sequences or all be"):
        pack([[Sequence([1])], [Sequence([2]), Sequence([3])]])
