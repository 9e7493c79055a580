"""The selection rule: k largest |x| per tile, lower position first on ties, on every code path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.kernels.topk import magnitude_keys, select


def _rule(x: torch.Tensor, k: int) -> list[list[int]]:
    """The rule written out: sort each row by (-|x|, position) and keep the first k positions."""
    rows = []
    for row in x.abs().tolist():
        order = sorted(range(len(row)), key=lambda p: (-row[p], p))
        rows.append(sorted(order[:k]))
    return rows


@settings(max_examples=60, deadline=None)
@given(
    tile_len=st.sampled_from([1, 7, 64, 96, 512, 1856, 4096]),
    levels=st.sampled_from([2, 3, 1000]),  # few levels: ties everywhere; many: almost none
    grouped=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_selection_follows_the_rule(tile_len: int, levels: int, grouped: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, levels, (4, tile_len), generator=g) - levels // 2).float()
    k = max(1, min(tile_len, round(tile_len * 64 / 4096)))
    got = select(magnitude_keys(x).view(4, tile_len), k, grouped=grouped)
    assert got.tolist() == _rule(x, k)


def test_non_finite_entries_are_always_selected() -> None:
    x = torch.randn(2, 4096) * 1e30
    x[0, 4000] = float("nan")
    x[1, 17] = float("-inf")
    got = select(magnitude_keys(x).view(2, 4096), 64)
    assert 4000 in got[0].tolist() and 17 in got[1].tolist()


@pytest.mark.parametrize("grouped", [True, False])
def test_all_equal_tiles_keep_their_first_entries(grouped: bool) -> None:
    x = torch.zeros(3, 4096)
    x[1] = -2.5
    got = select(magnitude_keys(x).view(3, 4096), 64, grouped=grouped)
    assert all(row == list(range(64)) for row in got.tolist())
