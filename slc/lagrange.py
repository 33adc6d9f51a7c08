"""One Lagrange multiplier: pick one point per item so the summed cost meets a budget with the least damage.

Each item (a layer) offers points (rate, distortion), e.g. ECSQ steps or ranks. For a multiplier
lam every item takes the point minimising D + lam * R; the summed rate falls as lam grows, so lam is
bisected (on log lam) until the rate meets the budget. The points are discrete, so a gap remains;
it is closed greedily with the single-item moves that buy the most distortion per bit.
Used by slc.allocate (bits per layer) and slc.lowrank (ranks per layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Point:
    """One candidate setting of one item."""
    kind: str                  # what the setting is: "ecsq" (a step), "int" (bits), "lowrank" (a rank)
    setting: float             # the ecsq step (x RMS), the int bits, or the rank
    bits: float                # its cost: total bits the layer will hold (or parameters, for ranks)
    distortion: float          # its damage: weighted output error, or estimated loss increase


def solve(points: dict[str, list[Point]], budget_total_bits: float, tolerance_bits: float):
    """Lagrangian choice of one point per item with sum(bits) close to budget_total_bits.

    Returns ({name: index into points[name]}, lam). Bisection on log(lam), then greedy single-item
    moves (best distortion per bit) to land within tolerance_bits of the budget from below if possible.
    """
    names = list(points)
    R = {n: np.array([p.bits for p in points[n]]) for n in names}
    D = {n: np.array([p.distortion for p in points[n]]) for n in names}

    def pick(lam):
        return {n: int(np.argmin(D[n] + lam * R[n])) for n in names}

    def total(ch):
        return sum(R[n][ch[n]] for n in names)

    min_total = sum(R[n].min() for n in names)
    max_total = sum(R[n].max() for n in names)
    if budget_total_bits < min_total:
        raise ValueError(f"budget is below the coarsest setting of every layer "
                         f"({min_total / sum(1 for _ in names):.0f} bits per layer); raise it or add coarser steps")
    if budget_total_bits >= max_total:
        return {n: int(np.argmax(R[n])) for n in names}, 0.0
    lo, hi = -60.0, 60.0                                            # log lam: lo = spend everything, hi = nothing
    for _ in range(100):
        mid = (lo + hi) / 2
        if total(pick(math.exp(mid))) > budget_total_bits:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    lam = math.exp(hi)
    ch = pick(lam)                                                  # at or under budget
    # greedy: the discrete hull leaves a gap; fill it with the moves that buy the most D per bit
    for _ in range(10 * len(names)):
        gap = budget_total_bits - total(ch)
        if abs(gap) <= tolerance_bits:
            break
        best, best_score = None, -math.inf
        for n in names:
            i = ch[n]
            for j in (i - 1, i + 1):
                if not 0 <= j < len(R[n]):
                    continue
                dr, dd = R[n][j] - R[n][i], D[n][j] - D[n][i]
                if gap > 0 and 0 < dr <= gap + tolerance_bits:      # spend: most D saved per bit
                    score = -dd / dr
                elif gap < 0 and dr < 0:                            # save: least D added per bit
                    score = dd / dr                                 # dd >= 0 > dr: closest to 0 adds least D per bit
                else:
                    continue
                if score > best_score:
                    best, best_score = (n, j), score
        if best is None:
            break
        ch[best[0]] = best[1]
    return ch, lam
