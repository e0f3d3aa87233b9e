"""Leaderboard plots (PNG and SVG) from stored entries: robust accuracy versus eps per model (worst case
at each evaluated eps, and the minimum-norm attack's whole curve where the entry stores one), and the
trade-off between perturbation robustness and invariance accuracy (one point per model, 95% intervals).
Metadata that would change between builds (dates, random SVG ids) is fixed, so rebuilding gives the
same bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from invarbench.io import atomic_write
from invarbench.leaderboard.entries import curve_robust_accuracy


def _save(figure, stem: Path) -> list[Path]:
    written = []
    for suffix, metadata in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
        path = stem.parent / f"{stem.name}.{suffix}"
        atomic_write(path, lambda tmp, suffix=suffix, metadata=metadata: figure.savefig(tmp, format=suffix, dpi=100, metadata=metadata))
        written.append(path)
    return written


def build_plots(entries: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "invarbench"
    written = []
    for dataset in sorted({entry["dataset"] for entry in entries}):
        perturbation = sorted((entry for entry in entries if entry["dataset"] == dataset and entry["track"] == "perturbation"), key=lambda entry: entry["model"])
        invariance = {entry["model"]: entry for entry in entries if entry["dataset"] == dataset and entry["track"] == "invariance"}
        norms = sorted({norm for entry in perturbation for norm in entry["results"]["threats"]})
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for norm in norms:
            figure, axis = plt.subplots(figsize=(6, 4))
            largest = max((float(eps) for entry in perturbation for eps in entry["results"]["threats"].get(norm, {})), default=1.0)
            grid = [largest * 1.25 * step / 200 for step in range(201)]
            curves = False
            for position, entry in enumerate(perturbation):
                per_eps = entry["results"]["threats"].get(norm, {})
                if not per_eps:
                    continue
                colour = colours[position % len(colours)]
                points = sorted((float(eps), result["worst_case"]["robust_accuracy"]) for eps, result in per_eps.items())
                axis.plot([0.0] + [eps for eps, _ in points], [entry["results"]["clean_accuracy"]] + [value for _, value in points], marker="o", linestyle="--", linewidth=1, color=colour, label=entry["model"])
                curve = entry["results"].get("curves", {}).get(norm)
                if curve:
                    # The minimum-norm attack's whole curve: robust at eps when its smallest adversarial norm is larger.
                    axis.plot(grid, [curve_robust_accuracy(curve, eps) for eps in grid], linewidth=1.5, color=colour, alpha=0.8)
                    curves = True
            axis.set_xlabel(f"{norm} eps")
            axis.set_ylabel("robust accuracy")
            axis.set_ylim(0, 1.02)
            what = "markers: worst case over all attacks; lines: minimum-norm attack" if curves else "worst case over all attacks"
            sizes = "/".join(str(size) for size in sorted({entry["settings"]["n"] for entry in perturbation if entry["results"]["threats"].get(norm)}))
            axis.set_title(f"{dataset}: robust accuracy versus {norm} eps (n={sizes or '-'})\n{what}", fontsize=9)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
            figure.tight_layout()
            written += _save(figure, out_dir / f"{dataset}-robustness-{norm}")
            plt.close(figure)
        settings = sorted({setting for entry in invariance.values() for setting in entry["results"]["invariance"].get("invariance-linf", {})})
        for setting in settings:
            eps = setting.partition(":")[2]
            figure, axis = plt.subplots(figsize=(6, 4))
            for entry in perturbation:
                robust = entry["results"]["threats"].get("linf", {}).get(eps)
                metrics = invariance.get(entry["model"], {}).get("results", {}).get("invariance", {}).get("invariance-linf", {}).get(setting)
                if robust is None or metrics is None or metrics["invariance_accuracy"] is None:
                    continue
                value, (low, high) = metrics["invariance_accuracy"], metrics["invariance_accuracy_ci95"]
                axis.errorbar(robust["worst_case"]["robust_accuracy"], value, yerr=[[value - low], [high - value]], fmt="o", capsize=3, label=entry["model"])
            axis.set_xlabel(f"worst-case robust accuracy, linf {eps}")
            axis.set_ylabel(f"invariance accuracy, invariance-linf {eps}")
            axis.set_xlim(-0.02, 1.02)
            axis.set_ylim(-0.02, 1.02)
            axis.set_title(f"{dataset}: sensitivity against invariance at linf {eps} (95% intervals)", fontsize=9)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
            figure.tight_layout()
            written += _save(figure, out_dir / f"{dataset}-tradeoff-linf-{eps}")
            plt.close(figure)
    return written
