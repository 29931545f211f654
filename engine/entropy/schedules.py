"""Group schedules: the order in which a masked-token entropy model codes an [h, w] grid of tokens.

A schedule is an int64 array [h, w] of group ids 0..G-1: every position is in exactly one group, every
group is non-empty and group g is coded after all groups < g, its tables predicted from the tokens of
groups < g (docs/entropy-model-arithmetic.md, "Schedules"). Each schedule is first defined by a raw
key per position; the ids are then the ranks of the distinct keys (`_ranks`), so a class that is
empty on a given grid (e.g. the diagonal centres of a 1 x w grid) takes no id.
"""

from typing import Callable, Dict, List

import numpy as np

MAX_SIDE = 4096  # grids up to 4096 x 4096 tokens


def _check_size(h: int, w: int) -> None:
    if not all(isinstance(v, (int, np.integer)) and 1 <= v <= MAX_SIDE for v in (h, w)):
        raise ValueError(f"a schedule needs 1 <= h, w <= {MAX_SIDE}, got {h} x {w}")


def _ranks(keys: np.ndarray) -> np.ndarray:
    """Raw keys -> consecutive group ids 0..G-1 in increasing key order."""
    _, ids = np.unique(keys, return_inverse=True)
    return ids.reshape(keys.shape).astype(np.int64)


def single(h: int, w: int) -> np.ndarray:
    """One group: every token is coded from MASK inputs only (a learned per-position prior)."""
    _check_size(h, w)
    return np.zeros((h, w), dtype=np.int64)


def checkerboard(h: int, w: int) -> np.ndarray:
    """Two groups: (i + j) even first, then (i + j) odd (one group for a 1 x 1 grid).

    >>> checkerboard(3, 4).tolist()
    [[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
    """
    _check_size(h, w)
    i, j = np.indices((h, w))
    return _ranks((i + j) & 1)


def coarse_stride(h: int, w: int) -> int:
    """S = 2^L of `coarse_to_fine`: the largest power of two below max(h, w) (1 when max(h, w) <= 2).

    So the coarsest lattice has 2 tokens along the longer side (4 for a square grid).

    >>> [coarse_stride(1, 1), coarse_stride(2, 2), coarse_stride(3, 1), coarse_stride(64, 48), coarse_stride(65, 8)]
    [1, 1, 2, 32, 64]
    """
    _check_size(h, w)
    return 1 << max(0, (max(h, w) - 1).bit_length() - 1)


def coarse_to_fine(h: int, w: int) -> np.ndarray:
    """Hierarchical schedule: the coarse lattice, then per finer level its diagonal centres, then its edges.

    With S = 2^L = `coarse_stride(h, w)` and, for a position (i, j), v = min(tz(i), tz(j), L)
    (tz: trailing zero bits, tz(0) = infinity): v = L is the coarse lattice (key 0). Otherwise the
    position is new at level l = L - v (stride s = 2^v); it is a diagonal centre (key 2l - 1) when
    i / s and j / s are both odd, an edge midpoint (key 2l) when exactly one is. Ids are the ranks
    of the keys present: up to 2L + 1 groups.

    >>> coarse_to_fine(5, 5).tolist()
    [[0, 4, 2, 4, 0], [4, 3, 4, 3, 4], [2, 4, 1, 4, 2], [4, 3, 4, 3, 4], [0, 4, 2, 4, 0]]
    >>> coarse_to_fine(1, 7).tolist()
    [[0, 2, 1, 2, 0, 2, 1]]
    """
    levels = coarse_stride(h, w).bit_length() - 1
    i, j = np.indices((h, w))
    v = np.full((h, w), levels, dtype=np.int64)
    for bit in range(levels - 1, -1, -1):  # v = the lowest bit set in i | j, capped at L
        v[((i | j) >> bit) & 1 == 1] = bit
    both_odd = ((i >> v) & 1) & ((j >> v) & 1)
    keys = np.where(v == levels, 0, 2 * (levels - v) - both_odd)
    return _ranks(keys)


SCHEDULES: Dict[str, Callable[[int, int], np.ndarray]] = {
    "single": single,
    "checkerboard": checkerboard,
    "coarse-to-fine": coarse_to_fine,
}


def make_schedule(name: str, h: int, w: int) -> np.ndarray:
    """The schedule `name` (a key of SCHEDULES) for an h x w grid."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name](h, w)


def group_positions(schedule: np.ndarray) -> List[np.ndarray]:
    """Flat (raster) indices of each group's positions, increasing within a group: a list of G int64 arrays."""
    flat = np.asarray(schedule).reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat)
    return np.split(order.astype(np.int64), np.cumsum(counts)[:-1])
