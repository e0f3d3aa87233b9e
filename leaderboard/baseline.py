"""Baselines: what earlier entries found at the headline threats, kept so that new entries can be compared.

A baseline file (``leaderboard/baselines/NAME.json``) is written once, by ``invarbench leaderboard
baseline``, from the perturbation entries stored at the time: per model and headline threat, the worst
case over the entry's attacks on all its points and, on its regression subset, which points any of them
broke (and which the official AutoAttack broke). The entries may then be replaced by a regeneration with
other attacks; ``build_tables`` compares the entries stored then with every baseline file
(``DATASET-baseline-comparison.md``): the regenerated worst case beside the baseline's and the regression
points that only the baseline's run broke. A regenerated leaderboard is at least as strong as the one it
replaces where the worst case is never higher and no such point is left.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from invarbench.attacks import ThreatModel
from invarbench.config import HEADLINE_THREATS
from invarbench.errors import InvarbenchError
from invarbench.io import atomic_write_text
from invarbench.leaderboard.entries import load_entries
from invarbench.tracks import PERTURBATION

SCHEMA = 1
#: The largest excess of a regenerated worst case over the baseline's that still counts as equal: one
#: point in a thousand (attacks with random starts differ by about that on points at the boundary).
TOLERANCE = 0.001


def headline_pairs(dataset: str) -> list[tuple[str, float]]:
    """The data set's headline (norm, eps) pairs, e.g. ``[("linf", 0.3), ("l2", 2.0)]`` for MNIST."""
    return [
        (threat.norm, eps)
        for threat in map(ThreatModel.parse, HEADLINE_THREATS.get(dataset, ()))
        for eps in threat.epsilons
    ]


def _worst_case(entry: dict[str, Any], norm: str, eps: float) -> dict[str, Any] | None:
    settings = entry["results"].get("threats", {}).get(norm, {})
    stored = next((value for key, value in settings.items() if float(key) == eps), None)
    return None if stored is None else stored["worst_case"]


def point_outcomes(records: pd.DataFrame, norm: str, eps: float) -> dict[str, list[int]]:
    """On a regression subset's records, at one threat: the points correct when clean, those any attack
    broke, and those the official AutoAttack broke (sorted test-set indices)."""
    at = records[(records["norm"] == norm) & ((records["eps"] - eps).abs() < 1e-9)]
    correct = at[at["label"] == at["clean_prediction"]]
    broken = correct[correct["ran"] & correct["success"]]
    return {
        "correct": sorted(int(index) for index in correct["index"].unique()),
        "broken": sorted(int(index) for index in broken["index"].unique()),
        "autoattack_broken": sorted(int(index) for index in broken[broken["attack"] == "autoattack"]["index"].unique()),
    }


def _records(entries_dir: Path, entry: dict[str, Any]) -> pd.DataFrame:
    return pd.read_parquet(entries_dir / entry["regression"]["file"])


def take_baseline(entries_dir: str | Path, *, note: str = "") -> dict[str, Any]:
    """The baseline of the perturbation entries in ``entries_dir`` (see the module's docstring)."""
    entries_dir = Path(entries_dir)
    pairs = []
    for entry in load_entries(entries_dir):
        if entry["track"] != PERTURBATION.name:
            continue
        records = _records(entries_dir, entry)
        for norm, eps in headline_pairs(entry["dataset"]):
            worst = _worst_case(entry, norm, eps)
            if worst is None:
                continue
            pairs.append(
                {
                    "model": entry["model"],
                    "dataset": entry["dataset"],
                    "norm": norm,
                    "eps": eps,
                    "n": entry["settings"]["n"],
                    "robust": worst["robust"],
                    "robust_accuracy": worst["robust_accuracy"],
                    "attacks": [attack["name"] for attack in entry["settings"]["attacks"]],
                    "checkpoint_sha256": entry["checkpoint_sha256"],
                    "entry_date": entry["date"],
                    "regression_points": entry["regression"]["points"],
                    **point_outcomes(records, norm, eps),
                }
            )
    if not pairs:
        raise InvarbenchError(
            f"no perturbation entry in {entries_dir} has a headline threat to take a baseline of; add entries first"
        )
    return {"schema": SCHEMA, "note": note, "pairs": sorted(pairs, key=lambda pair: (pair["model"], pair["norm"]))}


def write_baseline(baseline: dict[str, Any], path: str | Path) -> Path:
    """Write a baseline once: an existing file is never overwritten (it records what earlier code found)."""
    path = Path(path)
    if path.exists():
        raise InvarbenchError(f"{path} exists: a baseline is written once; give another --out to take a new one")
    # One line per pair: the point lists would take a line per index otherwise.
    pairs = ",\n".join(f"    {json.dumps(pair)}" for pair in baseline["pairs"])
    head = json.dumps({key: value for key, value in baseline.items() if key != "pairs"}, indent=2)[:-2]
    return atomic_write_text(path, f'{head},\n  "pairs": [\n{pairs}\n  ]\n}}\n')


def load_baselines(directory: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(name, baseline) of every ``*.json`` in ``directory``, by name; none where it does not exist."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    baselines = []
    for path in sorted(directory.glob("*.json")):
        baseline = json.loads(path.read_text(encoding="utf-8"))
        if baseline.get("schema") != SCHEMA:
            raise InvarbenchError(f"{path}: baseline schema {baseline.get('schema')!r}, this invarbench reads {SCHEMA}")
        baselines.append((path.stem, baseline))
    return baselines


def comparison_frame(
    baselines: list[tuple[str, dict[str, Any]]], entries_dir: str | Path, dataset: str
) -> pd.DataFrame:
    """One row per baseline pair of ``dataset`` that has a stored perturbation entry: the baseline's and the
    entry's worst case, their difference and the regression points only the baseline broke."""
    entries_dir = Path(entries_dir)
    entries = {
        entry["model"]: entry
        for entry in load_entries(entries_dir)
        if entry["track"] == PERTURBATION.name and entry["dataset"] == dataset
    }
    rows = []
    for name, baseline in baselines:
        for pair in baseline["pairs"]:
            entry = entries.get(pair["model"])
            if pair["dataset"] != dataset or entry is None:
                continue
            worst = _worst_case(entry, pair["norm"], pair["eps"])
            if worst is None:
                continue
            outcomes = point_outcomes(_records(entries_dir, entry), pair["norm"], pair["eps"])
            shared = set(pair["correct"]) & set(outcomes["correct"])
            only_baseline = sorted(set(pair["broken"]) & shared - set(outcomes["broken"]))
            only_entry = sorted(set(outcomes["broken"]) & shared - set(pair["broken"]))
            excess = worst["robust_accuracy"] - pair["robust_accuracy"]
            same_weights = entry["checkpoint_sha256"] == pair["checkpoint_sha256"]
            rows.append(
                {
                    "model": pair["model"],
                    "threat": f"{pair['norm']} {pair['eps']:g}",
                    "baseline": name,
                    "baseline attacks": ", ".join(pair["attacks"]),
                    "baseline worst case": f"{100 * pair['robust_accuracy']:.1f}% (N={pair['n']})",
                    "entry attacks": ", ".join(attack["name"] for attack in entry["settings"]["attacks"]),
                    "entry worst case": f"{100 * worst['robust_accuracy']:.1f}% (N={entry['settings']['n']})",
                    "difference (points)": f"{100 * excess:+.1f}",
                    "regression points": len(shared),
                    "broken only by the baseline": ", ".join(map(str, only_baseline)) or "none",
                    "broken only by the entry": ", ".join(map(str, only_entry)) or "none",
                    "as strong": "yes"
                    if same_weights and excess <= TOLERANCE + 1e-12 and not only_baseline
                    else ("no" if same_weights else "other checkpoint"),
                }
            )
    return pd.DataFrame(rows)
