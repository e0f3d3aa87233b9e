"""Regression check: re-evaluate stored entries on their regression subset and compare per sample.

Deterministic attacks (a seed and a batch fix their outcome) must reproduce every point's outcome
exactly; attacks with randomness must reproduce robust accuracy within their tolerance. A checkpoint
whose sha256 no longer matches its card fails the check too. ``update`` rewrites the entry's
regression records (and nothing else) from the new evaluation.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from invarbench.attacks import ATTACKS
from invarbench.errors import InvarbenchError
from invarbench.io import atomic_write
from invarbench.leaderboard.entries import ENTRIES_DIR, entry_stem, load_entries
from invarbench.store import as_records

# Robust-accuracy tolerance (absolute) of attacks whose outcome is random.
RANDOM_TOLERANCE = {"autoattack": 0.02}
COMPARED = {"perturbation": ("success", "adversarial_prediction"), "invariance": ("target_class", "oracle_label", "model_prediction")}


@dataclass
class CheckResult:
    entry: str
    passed: bool
    differences: list[str] = field(default_factory=list)


def _config(entry: dict, points: int):
    from invarbench.attacks.base import ThreatModel as Threat
    from invarbench.runner import AttackSpec, ModelSpec, RunConfig

    settings = entry["settings"]
    threats = []
    for spec in settings["threats"]:
        norm, _, values = spec.partition(":")
        threats.append(Threat(norm, tuple(float(value) for value in values.split(","))))
    attacks = tuple(AttackSpec(attack["name"], tuple((key, value) for key, value in attack["options"].items())) for attack in settings["attacks"])
    model = ModelSpec(entry["reference"], entry["dataset"])
    return RunConfig((model,), tuple(threats), attacks, n=points, seed=settings["seed"], shard_size=settings["shard_size"], cascade=settings["cascade"], oracle=settings.get("oracle"))


def check_entry(entry: dict, entries_dir: Path, *, points: int | None = None, update: bool = False, progress: bool = False) -> CheckResult:
    from invarbench.models import get_card, list_models
    from invarbench.runner import run_benchmark

    name = entry_stem(entry["model"], entry["dataset"], entry["track"])
    if entry["reference"] in list_models(role=None):
        card = get_card(entry["reference"])
        if card.checkpoint_sha256 != entry["checkpoint_sha256"]:
            return CheckResult(name, False, [f"checkpoint sha256 {card.checkpoint_sha256[:12]} of the card differs from the entry's {entry['checkpoint_sha256'][:12]}: the model changed; re-evaluate and `leaderboard add --replace`"])
    stored = as_records(pd.read_parquet(entries_dir / entry["regression"]["file"]))
    available = entry["regression"]["points"]
    shard_size = entry["settings"]["shard_size"]
    points = available if points is None else min(available, -(-points // shard_size) * shard_size)
    stored = stored[stored["index"] < points]
    with tempfile.TemporaryDirectory() as scratch:
        try:
            # On the entry's device: floating-point paths differ between devices, and exact comparisons need the same one.
            device = "cuda" if str(entry.get("device", "cpu")).startswith("cuda") else "cpu"
            run_benchmark(_config(entry, points), Path(scratch), name="check", progress=progress, device=device)
        except InvarbenchError as error:
            return CheckResult(name, False, [f"re-evaluation failed: {error}"])
        run = Path(scratch) / "check"
        fresh = as_records(pd.read_parquet(run / ("invariance.parquet" if entry["track"] == "invariance" else "results.parquet")))
    # Records are paired by attack name and by the attack's place among those of the same name, not by
    # its position in the run: an entry that keeps one track of a run (`leaderboard add --track`) has
    # fewer attacks than the run its records came from, so the positions differ.
    stored, fresh = _with_attack_rank(stored), _with_attack_rank(fresh)
    keys = ["norm", "eps", "attack", "attack_rank", "index"]
    merged = stored.merge(fresh, on=["model", *keys], how="outer", suffixes=("_stored", "_new"), indicator=True)
    differences = []
    for _, row in merged[merged["_merge"] != "both"].iterrows():
        differences.append(f"{row['attack']} {row['norm']} {row['eps']:g} point {row['index']}: {'missing from the new run' if row['_merge'] == 'left_only' else 'not in the stored records'}")
    both = merged[merged["_merge"] == "both"]
    for (attack, norm, eps), group in both.groupby(["attack", "norm", "eps"], sort=True):
        if entry["track"] == "perturbation" and not ATTACKS[attack].deterministic:
            old = 1 - group["success_stored"].fillna(False).astype(bool).mean()
            new = 1 - group["success_new"].fillna(False).astype(bool).mean()
            tolerance = RANDOM_TOLERANCE.get(attack, 0.0)
            if abs(old - new) > tolerance:
                differences.append(f"{attack} {norm} {eps:g}: attack success rate moved from {old:.3f} to {new:.3f} over {len(group)} records (tolerance {tolerance})")
            continue
        for column in COMPARED[entry["track"]]:
            changed = group[group[f"{column}_stored"].astype("object").fillna(-1).ne(group[f"{column}_new"].astype("object").fillna(-1))]
            for _, row in changed.iterrows():
                differences.append(f"{attack} {norm} {eps:g} point {row['index']}: {column} {_show(row[f'{column}_stored'])} -> {_show(row[f'{column}_new'])}")
    if update and differences:
        path = entries_dir / entry["regression"]["file"]
        atomic_write(path, lambda tmp: fresh.to_parquet(tmp, index=False))
    return CheckResult(name, not differences, differences)


def _with_attack_rank(records: pd.DataFrame) -> pd.DataFrame:
    """``records`` with ``attack_rank``: 1 for the first attack of its name in the run, 2 for a second
    one (the same attack with other options), and so on."""
    records = records.copy()
    records["attack_rank"] = records.groupby("attack")["attack_index"].rank(method="dense").astype(int)
    return records


def _show(value) -> str:
    return "NA" if pd.isna(value) else str(value)


def check_entries(entries_dir: str | Path = ENTRIES_DIR, *, names: list[str] | None = None, points: int | None = None, update: bool = False, progress: bool = False) -> list[CheckResult]:
    entries_dir = Path(entries_dir)
    entries = load_entries(entries_dir)
    if names:
        known = {entry_stem(entry["model"], entry["dataset"], entry["track"]): entry for entry in entries}
        missing = [name for name in names if name not in known and not any(entry["model"] == name for entry in entries)]
        if missing:
            raise InvarbenchError(f"no leaderboard entry named {', '.join(missing)} in {entries_dir}; use an entry file's stem (MODEL__DATASET__TRACK) or a model name")
        entries = [entry for stem, entry in known.items() if stem in names or entry["model"] in names]
    return [check_entry(entry, entries_dir, points=points, update=update, progress=progress) for entry in entries]


__all__ = ["CheckResult", "check_entries", "check_entry"]
