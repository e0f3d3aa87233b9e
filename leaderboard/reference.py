"""A reference attack on an entry's regression subset: what the leaderboard's own attacks missed.

The default leaderboard runs invarbench's attacks (``pgd``, ``fmn``, ``aa-fast``), not the official
AutoAttack. ``invarbench leaderboard reference`` (``make leaderboard-reference``) runs a reference attack,
by default ``autoattack`` (pyautoattack standard), at the data set's headline threats on each
perturbation entry's regression subset with the entry's seed, through the same runner, and keeps
beside the entry (``leaderboard/references/STEM.json``) per threat the points it broke and those among
them that the entry's attacks did not break. The perturbation tables show it as a column; a reference
made for an earlier version of the entry (another date or checkpoint) is not shown.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from invarbench.api import evaluate
from invarbench.io import atomic_write_text
from invarbench.leaderboard.baseline import headline_pairs, point_outcomes
from invarbench.leaderboard.entries import entry_stem
from invarbench.tracks import PERTURBATION

SCHEMA = 1


def references_dir(entries_dir: str | Path) -> Path:
    return Path(entries_dir).parent / "references"


def reference_record(entry: dict[str, Any], entry_records: pd.DataFrame, reference: pd.DataFrame, attack: str) -> dict:
    """Per headline threat: the points correct when clean, those ``reference`` broke, and those it broke
    that the entry's records show unbroken (``missed``)."""
    threats = []
    for norm, eps in headline_pairs(entry["dataset"]):
        theirs, ours = point_outcomes(reference, norm, eps), point_outcomes(entry_records, norm, eps)
        if not theirs["correct"]:
            continue
        shared = set(theirs["correct"]) & set(ours["correct"])
        threats.append(
            {
                "norm": norm,
                "eps": eps,
                "points": len(theirs["correct"]),
                "broken": theirs["broken"],
                "missed": sorted(set(theirs["broken"]) & shared - set(ours["broken"])),
            }
        )
    return {
        "schema": SCHEMA,
        "entry": entry_stem(entry["model"], entry["dataset"], entry["track"]),
        "entry_date": entry["date"],
        "checkpoint_sha256": entry["checkpoint_sha256"],
        "attack": attack,
        "seed": entry["settings"]["seed"],
        "points": entry["regression"]["points"],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "threats": threats,
    }


def run_reference(
    entry: dict[str, Any],
    entries_dir: str | Path,
    *,
    attack: str = "autoattack",
    runs_dir: str | Path,
    progress: bool = True,
) -> Path:
    """Run ``attack`` on ``entry``'s regression subset at the headline threats (resumable in ``runs_dir``)
    and write its reference file; returns the file."""
    entries_dir = Path(entries_dir)
    stem = entry_stem(entry["model"], entry["dataset"], entry["track"])
    pairs = headline_pairs(entry["dataset"])
    threats = [f"{norm}:{eps:g}" for norm, eps in pairs]
    results = evaluate(
        entry["model"],
        dataset=entry["dataset"],
        threats=threats,
        attacks=[attack],
        n=entry["regression"]["points"],
        seed=entry["settings"]["seed"],
        out=runs_dir,
        name=f"reference-{attack.replace(':', '-')}-{stem}",
        progress=progress,
    )
    record = reference_record(
        entry, pd.read_parquet(entries_dir / entry["regression"]["file"]), results.records, attack
    )
    return atomic_write_text(references_dir(entries_dir) / f"{stem}.json", json.dumps(record, indent=2) + "\n")


def load_reference(entries_dir: str | Path, entry: dict[str, Any]) -> dict[str, Any] | None:
    """The entry's reference, where one was made for this version of the entry."""
    path = references_dir(entries_dir) / f"{entry_stem(entry['model'], entry['dataset'], entry['track'])}.json"
    if entry["track"] != PERTURBATION.name or not path.exists():
        return None
    reference = json.loads(path.read_text(encoding="utf-8"))
    if reference["entry_date"] != entry["date"] or reference["checkpoint_sha256"] != entry["checkpoint_sha256"]:
        return None
    return reference


def describe(reference: dict[str, Any] | None) -> str:
    """A table cell: e.g. ``autoattack on 200 points: linf 0.3 0 missed, l2 2 1 missed (17)``."""
    if reference is None:
        return "-"
    parts = [
        f"{threat['norm']} {threat['eps']:g} {len(threat['missed'])} missed"
        + (f" ({', '.join(map(str, threat['missed']))})" if threat["missed"] else "")
        for threat in reference["threats"]
    ]
    return f"{reference['attack']} on {reference['points']} points: {', '.join(parts)}"
