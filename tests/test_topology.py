"""Which rank is which stage and replica, and its peers: pure arithmetic, no process groups."""

import pytest

from vgim_dist.pipeline.topology import Topology


def layout(replicas):
    return [Topology(tuple(replicas), r) for r in range(sum(replicas))]


def test_one_worker_per_stage_forms_a_chain():
    t = layout([1, 1, 1])
    assert [(w.stage, w.replica) for w in t] == [(0, 0), (1, 0), (2, 0)]
    assert [(w.upstream, w.downstream) for w in t] == [([], [1]), ([0], [2]), ([1], [])]
    assert [w.is_last for w in t] == [False, False, True]


def test_a_replicated_middle_stage_fans_out_and_gathers_in_batch_order():
    t = layout([1, 2, 1])
    assert [(w.stage, w.replica) for w in t] == [(0, 0), (1, 0), (1, 1), (2, 0)]
    assert t[0].downstream == [1, 2]                  # the single producer feeds both replicas
    assert t[1].upstream == t[2].upstream == [0]
    assert t[1].downstream == t[2].downstream == [3]
    assert t[3].upstream == [1, 2]                    # the single consumer gathers them in rank order
    assert t[1].ranks(1) == [1, 2] and t[3].first(2) == 3


def test_equal_replica_counts_pair_each_replica_with_its_twin():
    t = layout([2, 2])
    assert [w.downstream for w in t[:2]] == [[2], [3]]
    assert [w.upstream for w in t[2:]] == [[0], [1]]
    assert [(w.stage, w.replica) for w in t] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize(("replicas", "rank", "message"), [
    ([2, 3], 0, "neighbours need equal counts"),
    ([1, 1], 2, "outside a world of 2"),
])
def test_impossible_layouts_are_refused(replicas, rank, message):
    with pytest.raises(ValueError, match=message):
        Topology(tuple(replicas), rank)
