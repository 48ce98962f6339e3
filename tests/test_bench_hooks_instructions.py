"""The cachegrind model options of benchmarks/bench_hooks_instructions.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_hooks_instructions import cachegrind_model


def test_instructions_only_by_default() -> None:
    assert cachegrind_model(False, None, False) == ["--cache-sim=no"]


def test_a_sized_last_level_turns_the_cache_model_on() -> None:
    assert cachegrind_model(False, 1024, True) == [
        "--cache-sim=yes",
        "--LL=1048576,16,64",
        "--branch-sim=yes",
    ]


@pytest.mark.parametrize("kib", [0, 63, 100, -1024])
def test_a_last_level_valgrind_cannot_model_is_refused(kib: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        cachegrind_model(True, kib, False)
