"""Exact per-tile top-k by magnitude with a defined tie rule (torch; CPU and CUDA).

The rule every backend follows (wire-format.md, "Selection"): in each tile keep the ``k`` entries of largest
``|x|``; among equal magnitudes the lower position wins. Magnitudes are compared as the IEEE-754 bit patterns
of ``|x|`` read as int32, which orders all non-negative floats (and puts Inf, then NaN, above every finite
value, so a non-finite entry is always selected and the encoder sees it). ``-0.0`` and ``0.0`` are equal.

``torch.topk`` picks an arbitrary member of a tie (pitfall P8) and its choice differs between CPU and GPU, so
it is used only where no tie crosses the k-th place (checked by asking for k + 1 entries); rows with such a
tie are redone with one int64 composite key, ``(magnitude << 12) | (4095 - position)``, which has no ties.

Speed: a plain top-k over 4096-entry rows is the slow step of the codec. When a tile splits into groups of
``GROUP`` entries we first rank the groups by their largest member (same rule, lower group first on ties) and
keep the top ``k`` groups: the k largest entries always lie in them (the k group maxima are k entries >= the
k-th group maximum, and ties resolve to lower groups, which hold the lower positions), so the exact selection
then runs over ``k * GROUP`` candidates instead of the whole tile.
"""

from __future__ import annotations

import torch

# Entries per prefilter group: balances the two top-k passes (L / GROUP groups, then k * GROUP candidates;
# with L = 4096 and k = 64 both are 512).
GROUP = 8
# Position bits in the composite key: positions inside a tile are < 4096 (chunk <= 64).
POS_BITS = 12
POS_MASK = (1 << POS_BITS) - 1


def magnitude_keys(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 keys that order entries by ``|x|``; ``x`` float32, any layout. Writes into ``out`` if given."""
    mag = torch.abs(x, out=out) if out is not None else torch.abs(x)
    return mag.view(torch.int32)


def _top_slots(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Column numbers (unsorted) of the k largest keys per row, ties to the lower column."""
    n_rows, n_cols = keys.shape
    got = torch.topk(keys, k + 1, dim=1, sorted=False)
    kth_next = got.values.amin(dim=1, keepdim=True)
    # The (k+1)-th largest value equals the k-th exactly when it occurs twice among the k + 1 returned.
    tied = (got.values == kth_next).sum(dim=1) >= 2
    # Drop the (k+1)-th: the smallest returned value, the last such column if it repeats.
    cols = got.indices
    order = (got.values.to(torch.int64) << POS_BITS) | (POS_MASK - cols)
    drop = order.argmin(dim=1, keepdim=True)
    keep = torch.ones_like(cols, dtype=torch.bool).scatter_(1, drop, False)
    slots = cols[keep].view(n_rows, k)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        ids = torch.arange(n_cols, device=keys.device)
        comp = (keys[rows].to(torch.int64) << POS_BITS) | (POS_MASK - ids)
        picked = torch.topk(comp, k, dim=1, sorted=False).values
        slots[rows] = POS_MASK - (picked & POS_MASK)
    return slots


def select(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (int64, ascending per row) of the ``k`` largest keys of each row of ``keys`` (T, L)."""
    n_tiles, tile_len = keys.shape
    if k >= tile_len:
        return torch.arange(tile_len, device=keys.device).expand(n_tiles, tile_len).clone()
    n_groups = tile_len // GROUP
    if tile_len % GROUP == 0 and n_groups > k:
        group_max = keys.view(n_tiles, n_groups, GROUP).amax(dim=2)
        top_groups = _top_slots(group_max, k)
        candidates = (top_groups.unsqueeze(2) * GROUP + torch.arange(GROUP, device=keys.device)).view(
            n_tiles, -1
        )
        # Candidates must be in ascending position for the tie rule to map onto column order.
        candidates = torch.sort(candidates, dim=1).values
        slots = _top_slots(torch.gather(keys, 1, candidates), k)
        positions = torch.gather(candidates, 1, slots)
    else:
        positions = _top_slots(keys, k)
    return torch.sort(positions, dim=1).values
