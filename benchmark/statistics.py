"""Interval estimates shared by the runner, the oracle calibration and the leaderboard."""

from __future__ import annotations


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a binomial rate (sensible at 0 and 1, unlike the normal one)."""
    if trials == 0:
        return [0.0, 1.0]
    rate = successes / trials
    denominator = 1 + z**2 / trials
    centre = (rate + z**2 / (2 * trials)) / denominator
    half = z * ((rate * (1 - rate) / trials + z**2 / (4 * trials**2)) ** 0.5) / denominator
    return [max(0.0, centre - half), min(1.0, centre + half)]
