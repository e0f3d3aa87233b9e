"""Leaderboard plots (PNG and SVG) from stored entries: robust accuracy versus eps per model (worst case
at each evaluated eps, and the minimum-norm attack's whole curve where the entry stores one), and the
trade-off between perturbation robustness and invariance accuracy (one point per model, 95% intervals).
Metadata that would change between builds (dates, random SVG ids) is fixed, so rebuilding gives the
same bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from invarbench.attacks import Budget
from invarbench.io import write_figure
from invarbench.leaderboard.entries import curve_robust_accuracy
from invarbench.results import WORST_CASE, entry_results, invariance_frame, robustness_frame
from invarbench.tracks import INVARIANCE, PERTURBATION


def _save(figure, axis, stem: Path) -> list[Path]:
    """Finish ``figure`` (a legend where something is labelled, a tight layout), write it as PNG and SVG
    without the metadata that changes on every build, and close it."""
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)
    figure.tight_layout()
    written = []
    for suffix in ("png", "svg"):
        written.append(write_figure(stem.parent / f"{stem.name}.{suffix}", figure, suffix))
    import matplotlib.pyplot as plt  # imported by build_plots already, with its backend chosen

    plt.close(figure)
    return written


def build_plots(entries: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "invarbench"
    written = []
    for dataset in sorted({entry["dataset"] for entry in entries}):
        perturbation = sorted(
            (entry for entry in entries if entry["dataset"] == dataset and entry["track"] == PERTURBATION.name),
            key=lambda entry: entry["model"],
        )
        robustness = robustness_frame(entry_results(perturbation))
        worst = robustness[robustness["attack"] == WORST_CASE]
        linf_invariance = invariance_frame(
            entry_results(
                entry for entry in entries if entry["dataset"] == dataset and entry["track"] == INVARIANCE.name
            )
        )
        linf_invariance = linf_invariance[linf_invariance["attack"] == "invariance-linf"]
        norms = sorted(set(robustness["norm"]))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for norm in norms:
            figure, axis = plt.subplots(figsize=(6, 4))
            largest = worst.loc[worst["norm"] == norm, "eps"].max()
            grid = [largest * 1.25 * step / 200 for step in range(201)]
            curves = False
            for position, entry in enumerate(perturbation):
                own = worst[(worst["model"] == entry["model"]) & (worst["norm"] == norm)].sort_values("eps")
                if own.empty:
                    continue
                colour = colours[position % len(colours)]
                points = list(zip(own["eps"], own["robust_accuracy"]))
                axis.plot(
                    [0.0] + [eps for eps, _ in points],
                    [entry["results"]["clean_accuracy"]] + [value for _, value in points],
                    marker="o",
                    linestyle="--",
                    linewidth=1,
                    color=colour,
                    label=entry["model"],
                )
                curve = entry["results"].get("curves", {}).get(norm)
                if curve:
                    # The minimum-norm attack's whole curve: robust at eps when its smallest adversarial norm is larger.
                    axis.plot(
                        grid,
                        [curve_robust_accuracy(curve, eps) for eps in grid],
                        linewidth=1.5,
                        color=colour,
                        alpha=0.8,
                    )
                    curves = True
            axis.set_xlabel(f"{norm} eps")
            axis.set_ylabel("robust accuracy")
            axis.set_ylim(0, 1.02)
            what = (
                "markers: worst case over all attacks; lines: minimum-norm attack"
                if curves
                else "worst case over all attacks"
            )
            sizes = "/".join(
                str(size)
                for size in sorted(
                    {
                        entry["settings"]["n"]
                        for entry in perturbation
                        if entry["model"] in set(worst.loc[worst["norm"] == norm, "model"])
                    }
                )
            )
            axis.set_title(f"{dataset}: robust accuracy versus {norm} eps (n={sizes or '-'})\n{what}", fontsize=9)
            written += _save(figure, axis, out_dir / f"{dataset}-robustness-{norm}")
        linf_worst = worst[worst["norm"] == "linf"]
        robust = dict(zip(zip(linf_worst["model"], linf_worst["setting"]), linf_worst["robust_accuracy"]))
        figures = {(row["model"], row["setting"]): row for row in linf_invariance.to_dict("records")}
        for setting in sorted(set(linf_invariance["setting"])):
            eps = f"{Budget.parse(setting).value:g}"
            figure, axis = plt.subplots(figsize=(6, 4))
            for entry in perturbation:
                metrics = figures.get((entry["model"], setting))
                if (entry["model"], eps) not in robust or metrics is None or pd.isna(metrics["invariance_accuracy"]):
                    continue
                value, (low, high) = metrics["invariance_accuracy"], metrics["invariance_accuracy_ci95"]
                axis.errorbar(
                    robust[entry["model"], eps],
                    value,
                    yerr=[[value - low], [high - value]],
                    fmt="o",
                    capsize=3,
                    label=entry["model"],
                )
            axis.set_xlabel(f"worst-case robust accuracy, linf {eps}")
            axis.set_ylabel(f"invariance accuracy, invariance-linf {eps}")
            axis.set_xlim(-0.02, 1.02)
            axis.set_ylim(-0.02, 1.02)
            axis.set_title(f"{dataset}: sensitivity against invariance at linf {eps} (95% intervals)", fontsize=9)
            written += _save(figure, axis, out_dir / f"{dataset}-tradeoff-linf-{eps}")
    return written
