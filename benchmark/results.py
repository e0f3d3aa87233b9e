"""Typed views of results: the figures of a run's summary or of stored entries as long tables, one row
per measurement.

Summaries (``summary.json``) and entries keep their JSON layout, so stored entries stay readable; every
reader of figures (the run's printout, the Python API, the leaderboard's tables and plots) goes
through the two functions here instead of walking the nested dicts itself. Both take the per-model
results as a summary's ``models`` or an entry's ``results`` hold them: ``threats`` (norm -> eps ->
attacks and worst case) and ``invariance`` (attack -> setting -> metrics).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from invarbench.attacks import Budget

#: The ``attack`` of the row that holds the worst case over every attack at a threat.
WORST_CASE = "worst case"

ROBUSTNESS_COLUMNS = [
    "model",
    "norm",
    "setting",
    "eps",
    "attack",
    "robust_accuracy",
    "robust",
    "attacked",
    "broken",
    "attack_success_rate",
]
INVARIANCE_COLUMNS = ["model", "attack", "setting", "norm", "eps"]


def robustness_frame(results: Iterable[tuple[str, Mapping[str, Any]]]) -> pd.DataFrame:
    """One row per model, norm, eps and perturbation attack, and one ``WORST_CASE`` row per model, norm
    and eps: the robust accuracy after that attack (cumulative in cascade order, as the runner counts
    it) with the counts behind it. ``setting`` is the eps as stored (``f"{eps:g}"``), ``eps`` its value.
    Rows are not in cascade order (entries store attacks by name): order them by the run's or entry's
    attack order. ``results`` pairs a model name with its results (a summary's ``models.items()``, or
    :func:`entry_results`)."""
    rows = []
    for model, result in results:
        for norm, per_eps in result.get("threats", {}).items():
            for setting, outcome in per_eps.items():
                place = {"model": model, "norm": norm, "setting": setting, "eps": float(setting)}
                for attack, figures in outcome["attacks"].items():
                    rows.append({**place, "attack": attack, **{key: figures[key] for key in ROBUSTNESS_COLUMNS[5:]}})
                worst = outcome["worst_case"]
                rows.append(
                    {
                        **place,
                        "attack": WORST_CASE,
                        "robust_accuracy": worst["robust_accuracy"],
                        "robust": worst["robust"],
                    }
                )
    return pd.DataFrame(rows, columns=ROBUSTNESS_COLUMNS)


def invariance_frame(results: Iterable[tuple[str, Mapping[str, Any]]]) -> pd.DataFrame:
    """One row per model, invariance attack and setting (as stored: ``linf:0.3``, ``l0:25``) with every
    invariance metric the runner computed (``invariance_accuracy``, ``label_changed``, ``oracle`` as a
    list, 95% intervals as ``[low, high]`` pairs, ...); ``norm`` and ``eps`` split the setting (the
    budget for pseudo-norms). ``results`` as for :func:`robustness_frame`."""
    rows = []
    for model, result in results:
        for attack, per_setting in result.get("invariance", {}).items():
            for setting, metrics in per_setting.items():
                budget = Budget.parse(setting, lenient=True)
                rows.append(
                    {
                        "model": model,
                        "attack": attack,
                        "setting": setting,
                        "norm": budget.norm,
                        "eps": budget.value,
                        **metrics,
                    }
                )
    return pd.DataFrame(rows, columns=None if rows else INVARIANCE_COLUMNS)


def entry_results(entries: Iterable[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """Stored entries as (model, results) pairs, for the two functions above."""
    return [(entry["model"], entry["results"]) for entry in entries]
