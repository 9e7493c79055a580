"""How a tensor is cut into tiles, and how many entries each tile keeps.

SparseLoCo (docs/outer-methods.md, SparseLoCo) views a 2-D tensor ``(R, C)`` as tiles of ``h x w`` where
``h`` and ``w`` are the largest divisors of ``R`` and ``C`` that are <= ``chunk``; a 1-D tensor of length N
becomes tiles of ``s`` entries, ``s`` the largest divisor of N <= ``chunk``. We extend this to every rank by
viewing a tensor as 2-D: 0-D and 1-D as ``(1, N)`` (so ``h = 1`` and the tile is one run of ``s`` entries,
exactly the reference's 1-D rule), and rank > 2 as ``(shape[0], prod(shape[1:]))``.

Tiles are numbered row-major over the tile grid (``t = ty * X + tx``) and entries row-major inside a tile
(``p = r * w + c``); these are the numbers the wire format carries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Tile side cap: positions inside a tile must fit the 12-bit fixed index coding (64 * 64 = 4096 = 2**12).
MAX_CHUNK = 64


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is <= ``cap`` (1 for n <= 1)."""
    for d in range(min(n, cap), 1, -1):
        if n % d == 0:
            return d
    return 1


@dataclass(frozen=True)
class TileLayout:
    """One tensor's tiling: its 2-D view ``(rows, cols)`` cut into ``h x w`` tiles, ``k`` kept per tile."""

    rows: int
    cols: int
    h: int
    w: int
    k: int

    @property
    def tile_len(self) -> int:
        return self.h * self.w

    @property
    def tiles_y(self) -> int:
        return self.rows // self.h

    @property
    def tiles_x(self) -> int:
        return self.cols // self.w

    @property
    def n_tiles(self) -> int:
        return self.tiles_y * self.tiles_x

    @property
    def n_kept(self) -> int:
        return self.n_tiles * self.k

    @property
    def numel(self) -> int:
        return self.rows * self.cols


def view_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view a tensor of ``shape`` is tiled as."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def kept_per_tile(tile_len: int, chunk: int, topk_per_tile: int) -> int:
    """Entries kept in a tile of ``tile_len``: the full-tile count scaled by area, at least 1, at most all.

    ``floor(x + 0.5)`` rather than Python's ``round`` so the rule is the same in every language.
    """
    scaled = math.floor(tile_len * topk_per_tile / (chunk * chunk) + 0.5)
    return max(1, min(tile_len, scaled))


def layout(shape: tuple[int, ...], chunk: int, topk_per_tile: int) -> TileLayout:
    rows, cols = view_2d(shape)
    h = largest_divisor_at_most(rows, chunk)
    w = largest_divisor_at_most(cols, chunk)
    return TileLayout(rows, cols, h, w, kept_per_tile(h * w, chunk, topk_per_tile))
