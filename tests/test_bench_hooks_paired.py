"""The summary of the paired hooks benchmark (benchmarks/bench_hooks_paired.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_hooks_paired import Slice, quartiles, summarize


def _pair(ours: float, peer: float, ours_p99: float = 40.0) -> dict[str, Slice]:
    return {"ours": Slice(ours, ours_p99, 3.0, 0), "peer": Slice(peer, 45.0, 2.5, 0)}


def test_the_ratio_is_taken_within_each_pair_not_between_pooled_rates() -> None:
    # The machine slows both apps in the second pair: pooled medians would mix the two.
    pairs = [_pair(900, 1000), _pair(450, 500), _pair(950, 1000)]
    summary = summarize(pairs)
    assert summary.ratios == pytest.approx([0.9, 0.9, 0.95])
    low, mid, high = summary.ratio_quartiles
    assert mid == pytest.approx(0.9)
    assert low <= mid <= high == pytest.approx(0.925)
    assert summary.apps["ours"]["rps"] == 900
    assert summary.apps["peer"]["p99_ms"] == 45.0
    assert summary.apps["ours"]["errors"] == 0


def test_quartiles_of_one_pair_are_that_pair() -> None:
    assert quartiles([0.8]) == (0.8, 0.8, 0.8)
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
