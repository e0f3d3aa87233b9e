"""Leaderboard plots (SVG) from stored entries: robust accuracy versus eps per model (worst case
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


def _save(figure, axis, stem: Path, formats: tuple[str, ...] = ("svg",)) -> list[Path]:
    """Finish ``figure`` (a legend where something is labelled, a tight layout), write it as SVG (text kept
    as text: a third of the bytes of a PNG of these plots, and sharp at any size) without the metadata that
    changes on every build, and close it."""
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)
    figure.tight_layout()
    written = []
    for suffix in formats:
        written.append(write_figure(stem.parent / f"{stem.name}.{suffix}", figure, suffix))
    import matplotlib.pyplot as plt  # imported by build_plots already, with its backend chosen

    plt.close(figure)
    return written


def build_plots(entries: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "invarbench"
    # Text as text, not glyph outlines: the SVGs are half the size (they are kept in the repository).
    plt.rcParams["svg.fonttype"] = "none"
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
        for norm in norms:
            figure, axis = plt.subplots(figsize=(6, 4))
            _robustness_axis(plt, axis, dataset, norm, perturbation, worst)
            written += _save(figure, axis, out_dir / f"{dataset}-robustness-{norm}")
        # One small SVG per model for its page: its curves in colour and bold over the others' worst case in
        # grey (its curve on a coarser grid, so that nine of them stay small).
        for entry in perturbation:
            own = [norm for norm in norms if ((worst["model"] == entry["model"]) & (worst["norm"] == norm)).any()]
            if not own:
                continue
            figure, axes = plt.subplots(1, len(own), figsize=(4.5 * len(own), 3.2), squeeze=False)
            for axis, norm in zip(axes[0], own):
                _robustness_axis(plt, axis, dataset, norm, perturbation, worst, highlight=entry["model"], steps=40)
            written += _save(figure, axes[0][-1], out_dir / "models" / f"{entry['model']}-robustness", formats=("svg",))
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


def _robustness_axis(
    plt,
    axis,
    dataset: str,
    norm: str,
    perturbation: list[dict[str, Any]],
    worst: pd.DataFrame,
    *,
    highlight: str | None = None,
    steps: int = 200,
) -> None:
    """Robust accuracy versus ``norm`` eps of every model on ``axis``: the worst case at each evaluated eps
    (markers) and the minimum-norm attack's curve (lines, on ``steps`` + 1 eps); with ``highlight``, that
    model in colour over the others' worst case in grey."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    largest = worst.loc[worst["norm"] == norm, "eps"].max()
    grid = [largest * 1.25 * step / steps for step in range(steps + 1)]
    curves = False
    # The highlighted model is drawn last, on top of the others.
    ordered = sorted(enumerate(perturbation), key=lambda pair: pair[1]["model"] == highlight)
    for position, entry in ordered:
        own = worst[(worst["model"] == entry["model"]) & (worst["norm"] == norm)].sort_values("eps")
        if own.empty:
            continue
        mine = highlight is None or entry["model"] == highlight
        colour = colours[position % len(colours)] if mine else "#c8c8c8"
        width = 2.5 if highlight is not None and mine else 1.5
        points = list(zip(own["eps"], own["robust_accuracy"]))
        axis.plot(
            [0.0] + [eps for eps, _ in points],
            [entry["results"]["clean_accuracy"]] + [value for _, value in points],
            marker="o" if mine else None,
            linestyle="--",
            linewidth=width - 0.5,
            color=colour,
            label=entry["model"] if mine else None,
        )
        curve = entry["results"].get("curves", {}).get(norm) if mine else None
        if curve:
            # The minimum-norm attack's whole curve: robust at eps when its smallest adversarial norm is larger.
            axis.plot(
                grid,
                [curve_robust_accuracy(curve, eps) for eps in grid],
                linewidth=width,
                color=colour,
                alpha=0.8,
            )
            curves = True
    axis.set_xlabel(f"{norm} eps")
    axis.set_ylabel("robust accuracy")
    axis.set_ylim(0, 1.02)
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
    if highlight is not None:
        axis.set_title(f"robust accuracy versus {norm} eps (n={sizes or '-'}), others in grey", fontsize=8)
        return
    what = (
        "markers: worst case over all attacks; lines: minimum-norm attack" if curves else "worst case over all attacks"
    )
    axis.set_title(f"{dataset}: robust accuracy versus {norm} eps (n={sizes or '-'})\n{what}", fontsize=9)
