"""Exact per-tile top-k by magnitude with a defined tie rule (torch; CPU and CUDA).

The rule every backend follows (wire-format.md, "Selection"): in each tile keep the ``k`` entries of largest
``|x|``; among equal magnitudes the lower position wins. Magnitudes are compared as the IEEE-754 bit patterns
of ``|x|`` read as int32, which orders all non-negative floats (and puts Inf, then NaN, above every finite
value, so a non-finite entry is always selected and the encoder sees it). ``-0.0`` and ``0.0`` are equal.

``torch.topk`` picks an arbitrary member of a tie (docs/outer-methods.md, P8) and its choice differs between
CPU and GPU, so it is used only where no tie crosses the k-th place (checked by asking for k + 1 entries);
rows with such a tie are redone with one int64 composite key, ``(magnitude << 12) | (4095 - position)``,
which has no ties.

Speed: a plain top-k over 4096-entry rows is the slow step of the codec. When a tile splits into groups of
``GROUP`` entries we first take the ``k`` groups with the largest maxima: when no tie crosses the k-th group,
every entry outside them is below the k-th group maximum, itself <= the k-th largest entry, so the k largest
entries lie among the ``k * GROUP`` candidates, and the second top-k runs over those instead of the tile.
"""

from __future__ import annotations

import torch

# Entries per prefilter group: balances the two top-k passes (L / GROUP groups, then k * GROUP candidates;
# with L = 4096 and k = 64 both are 512).
GROUP = 8
# Whether to prefilter by groups: measured 1.3-1.5x faster than one top-k over whole 4096-entry tiles (CPU).
USE_GROUPS = True
# Position bits in the composite key: positions inside a tile are < 4096 (chunk <= 64).
POS_BITS = 12
POS_MASK = (1 << POS_BITS) - 1


def magnitude_keys(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 keys that order entries by ``|x|``; ``x`` float32, any layout. Writes into ``out`` if given."""
    mag = torch.abs(x, out=out) if out is not None else torch.abs(x)
    return mag.view(torch.int32)


def _top(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns of the k largest keys per row in any tie order, rows where a tie crosses the k-th place)."""
    got = torch.topk(keys, k + 1, dim=1, sorted=True)
    return got.indices[:, :k], got.values[:, k - 1] == got.values[:, k]


def _exact(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the k largest keys per row, ties to the lower column (slow path: int64 composite keys)."""
    ids = torch.arange(keys.shape[1], device=keys.device)
    picked = torch.topk((keys.to(torch.int64) << POS_BITS) | (POS_MASK - ids), k, dim=1, sorted=False).values
    return POS_MASK - (picked & POS_MASK)


def select(keys: torch.Tensor, k: int, grouped: bool | None = None) -> torch.Tensor:
    """Positions (int64, ascending per row) of the ``k`` largest keys of each row of ``keys`` (T, L)."""
    n_tiles, tile_len = keys.shape
    if k >= tile_len:
        return torch.arange(tile_len, device=keys.device).expand(n_tiles, tile_len).clone()
    n_groups = tile_len // GROUP
    if grouped is None:
        grouped = USE_GROUPS
    if grouped and tile_len % GROUP == 0 and n_groups > k:
        top_groups, tied = _top(keys.view(n_tiles, n_groups, GROUP).amax(dim=2), k)
        offsets = torch.arange(GROUP, device=keys.device)
        candidates = (top_groups.unsqueeze(2) * GROUP + offsets).view(n_tiles, -1)
        slots, tied_in_candidates = _top(torch.gather(keys, 1, candidates), k)
        positions = torch.gather(candidates, 1, slots)
        # Without a tie at either boundary both selections are unique, so the group rule needs no tie order.
        tied |= tied_in_candidates
    else:
        positions, tied = _top(keys, k)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        positions[rows] = _exact(keys[rows], k)
    return torch.sort(positions, dim=1).values
