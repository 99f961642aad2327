"""IdPool: ids with owners; every misuse is a CallError and leaves the pool unchanged."""

import pytest

from pie_trio.executor.pool import IdPool
from pie_trio.model.calls import CallError


def test_alloc_free_reuses_lowest_ids_first():
    pool = IdPool(8, "page")
    assert pool.alloc("a", 3) == [0, 1, 2]
    assert pool.alloc("b", 2) == [3, 4]
    pool.free("a", [1, 0])
    assert pool.alloc("c", 3) == [0, 1, 5]
    assert pool.owner_of(5) == "c" and pool.owner_of(2) == "a" and pool.owner_of(7) is None
    assert (pool.num_used, pool.num_free) == (6, 2)
    assert pool.free_all("a") == [2]
    assert pool.owned_by("a") == []


@pytest.mark.parametrize(
    "action, message",
    [
        (lambda p: p.alloc("a", 9), "out of pages"),
        (lambda p: p.alloc("a", -1), "count >= 0"),
        (lambda p: p.free("b", [0]), "not allocated to 'b'"),
        (lambda p: p.free("a", [0, 0]), "listed twice"),
        (lambda p: p.free("a", [0, 5]), "page 5 is not allocated"),
        (lambda p: p.check("a", [0, 99]), "page 99 is not allocated"),
        (lambda p: p.check("a", ["0"]), "is not allocated"),
    ],
)
def test_misuse_fails_and_changes_nothing(action, message):
    pool = IdPool(8, "page")
    pool.alloc("a", 2)
    with pytest.raises(CallError, match=message):
        action(pool)
    assert pool.owned_by("a") == [0, 1] and pool.num_free == 6
