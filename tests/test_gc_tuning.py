"""fleet/gc_tuning.py: a serving process collects its old generation far less often."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from fleet.gc_tuning import THRESHOLDS, tune_for_serving


@pytest.fixture
def thresholds_put_back() -> Iterator[None]:
    kept = gc.get_threshold()
    yield
    gc.set_threshold(*kept)


def test_serving_sets_thresholds_far_above_cpython_s(thresholds_put_back: None) -> None:
    gc.set_threshold(700, 10, 10)  # CPython's own
    tune_for_serving()
    assert gc.get_threshold() == THRESHOLDS
    young, middle, old = THRESHOLDS
    assert young * middle * old >= 100 * 700 * 10 * 10  # a full collection 100 times rarer
    assert gc.isenabled()


def test_a_young_cycle_is_still_collected(thresholds_put_back: None) -> None:
    tune_for_serving()

    class Node:
        other: Node

    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    assert gc.collect(0) >= 2
