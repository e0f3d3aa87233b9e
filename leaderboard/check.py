"""Regression check: re-evaluate stored entries on their regression subset and compare per sample.

Deterministic attacks (a seed and a batch fix their outcome) must reproduce every point's outcome,
except where it was decided within a float-rounding margin: another CPU (other vector kernels) or
thread count rounds differently, and a point whose outcome sat on a boundary may fall on the other
side. Each record stores what decided it, and a flip is allowed only where the stored or the new
record was within these margins (counted and printed apart as borderline):

- the attacked model's logit margin (label against the best other class, or top-two gap at an
  invariance candidate) at most ``LOGIT_TOLERANCE``;
- a voting oracle's outcome at most one member's votes from changing (a member reads every view of
  a candidate, and one whose own decision sits on a boundary moves all of them: 2 votes for
  ``proxy:mnist-readers``'s two views; ``ORACLE_VOTE_TOLERANCE`` where the entry does not say);
- a minimum-norm attack's norm within ``NORM_TOLERANCE`` (relative) of eps.

Every rate over the checked points (attack success; label changed, abstained, model agrees with the
oracle) must also stay within ``AGGREGATE_TOLERANCE``, so borderline flips cannot pile up into a
different figure, and the median change of the model's margins over the points both runs recorded
must stay within ``MARGIN_DRIFT_TOLERANCE``: rounding moves a few trajectories, a changed weight
moves every margin. Attacks with randomness must reproduce their success rate within their own
tolerance. A checkpoint whose sha256 no longer matches its card fails the check too; a thread count
or CPU other than the entry's is reported. ``update`` rewrites the entry's regression records (and
nothing else) from the new evaluation.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from invarbench.attacks import ATTACKS, MinimumNormAttack
from invarbench.config import FORMER_UNGUIDED, entry_config, rerun_as
from invarbench.environment import cpu_description, resolve_device
from invarbench.errors import InvarbenchError
from invarbench.io import atomic_write, sha256_file
from invarbench.leaderboard.entries import ENTRIES_DIR, entry_stem, load_entries
from invarbench.models import get_card, list_models
from invarbench.oracles import list_oracles
from invarbench.runner import run_benchmark
from invarbench.store import as_records
from invarbench.tracks import get_track

# Robust-accuracy tolerance (absolute) of attacks whose outcome is random.
RANDOM_TOLERANCE = {"autoattack": 0.02}
LOGIT_TOLERANCE = 0.1
ORACLE_VOTE_TOLERANCE = 1
NORM_TOLERANCE = 0.01
AGGREGATE_TOLERANCE = 0.03
MARGIN_DRIFT_TOLERANCE = 0.05


@dataclass
class CheckResult:
    entry: str
    passed: bool
    differences: list[str] = field(default_factory=list)
    #: Flips of outcomes decided within the tolerances (allowed).
    borderline: list[str] = field(default_factory=list)
    #: The machine differs from the entry's (thread count, CPU): borderline flips are to be expected; or a
    #: search was re-checked with the former one that chose by its judge.
    warnings: list[str] = field(default_factory=list)


def check_entry(
    entry: dict,
    entries_dir: Path,
    *,
    points: int | None = None,
    update: bool = False,
    progress: bool = False,
    device: str | None = None,
) -> CheckResult:
    """Re-run ``entry``'s first ``points`` points with its settings and compare them with its stored
    records. ``device`` (cpu or cuda) re-runs them elsewhere than the entry's own device: another
    floating-point path moves trajectories, so points may then flip (reported as borderline) and only
    the rates (``AGGREGATE_TOLERANCE``) and the margins' drift are held to the stored records."""
    name = entry_stem(entry["model"], entry["dataset"], entry["track"])
    if entry["reference"] in list_models(role=None):
        card = get_card(entry["reference"])
        if card.checkpoint_sha256 != entry["checkpoint_sha256"]:
            return CheckResult(
                name,
                False,
                [
                    f"checkpoint sha256 {card.checkpoint_sha256[:12]} of the card differs from the entry's"
                    f" {entry['checkpoint_sha256'][:12]}: the model changed; re-evaluate and `leaderboard add"
                    " --replace`"
                ],
            )
    elif Path(entry["reference"]).is_file() and sha256_file(entry["reference"]) != entry["checkpoint_sha256"]:
        return CheckResult(
            name,
            False,
            [
                f"checkpoint {entry['reference']} has sha256 {sha256_file(entry['reference'])[:12]}, the entry's is"
                f" {entry['checkpoint_sha256'][:12]}: the model changed; re-evaluate and `leaderboard add --replace`"
            ],
        )
    judge = oracle_changes(entry)
    if judge:
        return CheckResult(name, False, judge)
    track = get_track(entry["track"])
    stored = as_records(pd.read_parquet(entries_dir / entry["regression"]["file"]), track.columns)
    available = entry["regression"]["points"]
    shard_size = entry["settings"]["shard_size"]
    points = available if points is None else min(available, -(-points // shard_size) * shard_size)
    stored = stored[stored["index"] < points]
    with tempfile.TemporaryDirectory() as scratch:
        try:
            # By default on the entry's device: floating-point paths differ between devices, and exact comparisons
            # need the same one.
            stored_device = "cuda" if str(entry.get("device", "cpu")).startswith("cuda") else "cpu"
            run_benchmark(
                entry_config(entry, points),
                Path(scratch),
                name="check",
                progress=progress,
                device=device or stored_device,
            )
        except InvarbenchError as error:
            return CheckResult(name, False, [f"re-evaluation failed: {error}"])
        run = Path(scratch) / "check"
        fresh = as_records(pd.read_parquet(run / track.records_file), track.columns)
    # Records are paired by attack name and by the attack's place among those of the same name, not by
    # its position in the run: an entry that keeps one track of a run (`leaderboard add --track`) has
    # fewer attacks than the run its records came from, so the positions differ.
    stored, fresh = _with_attack_rank(stored), _with_attack_rank(fresh)
    other_device = bool(device) and device != stored_device
    keys = ["norm", "eps", "attack", "attack_rank", "index"]
    merged = stored.merge(fresh, on=["model", *keys], how="outer", suffixes=("_stored", "_new"), indicator=True)
    differences, borderline = [], []
    for _, row in merged[merged["_merge"] != "both"].iterrows():
        differences.append(
            f"{row['attack']} {row['norm']} {row['eps']:g} point {row['index']}:"
            f" {'missing from the new run' if row['_merge'] == 'left_only' else 'not in the stored records'}"
        )
    both = merged[merged["_merge"] == "both"]
    votes = _member_votes(entry)
    for (attack, norm, eps), group in both.groupby(["attack", "norm", "eps"], sort=True):
        if not track.per_point(attack):
            old = 1 - group["success_stored"].fillna(False).astype(bool).mean()
            new = 1 - group["success_new"].fillna(False).astype(bool).mean()
            tolerance = RANDOM_TOLERANCE.get(attack, 0.0)
            if abs(old - new) > tolerance:
                differences.append(
                    f"{attack} {norm} {eps:g}: attack success rate moved from {old:.3f} to {new:.3f} over {len(group)}"
                    f" records (tolerance {tolerance})"
                )
            continue
        for _, row in group.iterrows():
            changed = [column for column in track.compared if _differs(row[f"{column}_stored"], row[f"{column}_new"])]
            if not changed:
                continue
            line = f"{attack} {norm} {eps:g} point {row['index']}: " + ", ".join(
                f"{column} {_show(row[f'{column}_stored'])} -> {_show(row[f'{column}_new'])}" for column in changed
            )
            # On another device every trajectory may round its own way: a point's outcome is then held to
            # the rates below, like an attack with randomness, not to its stored record.
            reasons = [
                (
                    f"re-run on {device}, stored on {stored_device}"
                    if other_device
                    else _borderline(column, row, attack, eps, votes)
                )
                for column in changed
            ]
            if all(reasons):
                borderline.append(f"{line} ({'; '.join(sorted(set(reasons)))})")
            else:
                differences.append(f"{line} ({_margins(changed, row)})")
        margin = track.margin
        drift = (group[f"{margin}_stored"] - group[f"{margin}_new"]).abs().dropna() if margin else pd.Series()
        if len(drift) and drift.median() > MARGIN_DRIFT_TOLERANCE:
            differences.append(
                f"{attack} {norm} {eps:g}: the model's margins moved by {drift.median():.3f} logits (median over"
                f" {len(drift)} records; tolerance {MARGIN_DRIFT_TOLERANCE}): the model or the attack changed"
            )
        for rate, stored_value, new_value in track.rates(group):
            if abs(stored_value - new_value) > AGGREGATE_TOLERANCE + 1e-9:
                differences.append(
                    f"{attack} {norm} {eps:g}: {rate} moved from {stored_value:.3f} to {new_value:.3f} over"
                    f" {len(group)} records (tolerance {AGGREGATE_TOLERANCE})"
                )
    if update and differences:
        path = entries_dir / entry["regression"]["file"]
        atomic_write(path, lambda tmp: fresh.to_parquet(tmp, index=False))
    moved = (
        [
            f"stored on {stored_device}, re-run on {device}: each point's outcome may flip (listed as borderline);"
            f" every rate must stay within {AGGREGATE_TOLERANCE}"
        ]
        if other_device
        else []
    )
    return CheckResult(
        name, not differences, differences, borderline, machine_warnings(entry) + judge_guided_warnings(entry) + moved
    )


def oracle_changes(entry: dict) -> list[str]:
    """How the named oracles that judged an invariance entry differ today from when it was stored
    (members' checkpoints, views, agreement): a changed judge changes the figures."""
    definitions = list_oracles()
    changes = []
    for name, report in sorted(entry["results"].get("oracles", {}).items()):
        if name not in definitions:
            continue
        definition = definitions[name]
        current = {
            "members": definition.member_checkpoints(),
            "views": [view.to_dict() for view in definition.views],
            "agreement": definition.agreement,
        }
        for key, value in current.items():
            if key in report and report[key] != value:
                changes.append(
                    f"oracle {name}: {key} {report[key]} when stored, {value} now; the judge of its invariance figures"
                    f" changed: re-evaluate the entry (`invarbench run ... --oracle {name}`, then `leaderboard add"
                    " --replace`)"
                )
    return changes


def _differs(stored, new) -> bool:
    return (pd.isna(stored) != pd.isna(new)) or (not pd.isna(stored) and stored != new)


def _within(values, tolerance: float) -> bool:
    return any(not pd.isna(value) and abs(value) <= tolerance for value in values)


def _member_votes(entry: dict) -> int:
    """Votes one member of the entry's voting oracle casts (one per view)."""
    views = [len(report["views"]) for report in entry["results"].get("oracles", {}).values() if report.get("views")]
    return max(views, default=ORACLE_VOTE_TOLERANCE)


def _borderline(column: str, row: pd.Series, attack: str, eps: float, votes: int) -> str:
    """Why a changed ``column`` of a paired record was decided within a tolerance ('' if it was not)."""
    if column in ("success", "adversarial_prediction"):
        if _within((row["logit_margin_stored"], row["logit_margin_new"]), LOGIT_TOLERANCE):
            return f"logit margin within {LOGIT_TOLERANCE}"
        if (
            issubclass(ATTACKS[attack], MinimumNormAttack)
            and eps > 0
            and _within(
                (row["perturbation_norm_stored"] / eps - 1, row["perturbation_norm_new"] / eps - 1), NORM_TOLERANCE
            )
        ):
            return f"norm within {NORM_TOLERANCE:.0%} of eps"
        return ""
    if column == "model_prediction":
        return (
            f"model margin within {LOGIT_TOLERANCE}"
            if _within((row["model_margin_stored"], row["model_margin_new"]), LOGIT_TOLERANCE)
            else ""
        )
    if column not in ("oracle_label", "target_class"):
        return ""  # a column no margin decides (another track's): any flip is a difference
    # The oracle's label, and the target class a search takes from it.
    return (
        f"oracle within one member's {votes} votes of changing"
        if _within((row["oracle_margin_stored"], row["oracle_margin_new"]), votes)
        else ""
    )


MARGIN_OF = {
    "success": "logit_margin",
    "adversarial_prediction": "logit_margin",
    "model_prediction": "model_margin",
    "oracle_label": "oracle_margin",
    "target_class": "oracle_margin",
}


def _margins(changed: list[str], row: pd.Series) -> str:
    """The stored and new margins behind the changed columns, e.g. ``oracle_margin NA -> 3``."""
    columns = dict.fromkeys(MARGIN_OF[column] for column in changed if column in MARGIN_OF)
    return "; ".join(
        f"{column} {_show_margin(row[f'{column}_stored'])} -> {_show_margin(row[f'{column}_new'])}"
        for column in columns
    )


def _show_margin(value) -> str:
    return "NA" if pd.isna(value) else f"{value:.3g}"


def judge_guided_warnings(entry: dict) -> list[str]:
    """The entry's searches that were re-checked with the former search that chose by its judge."""
    return [
        f"{attack['name']} was stored by the former search, which chose its candidates by its judge; re-checked with it"
        f" ({rerun_as(attack)}); its figures are inflated by candidates made to please the judge: re-run the entry for"
        " figures from a guide that is not the judge"
        for attack in entry["settings"]["attacks"]
        if attack["name"] in FORMER_UNGUIDED and rerun_as(attack) != attack["name"]
    ]


def machine_warnings(entry: dict) -> list[str]:
    """How this machine differs from the one the entry was evaluated on (thread count, CPU)."""
    machine = entry.get("machine")
    if not machine:
        return [
            "the entry does not record the thread count and CPU it was evaluated with (stored before they were"
            " recorded); outcomes decided within the tolerances may flip"
        ]
    here = {"threads": torch.get_num_threads(), "cpu": cpu_description()}
    return [
        f"{key} {machine[key]} when stored, {here[key]} here: outcomes decided within the tolerances may flip"
        for key in here
        if key in machine and machine[key] != here[key]
    ]


def _with_attack_rank(records: pd.DataFrame) -> pd.DataFrame:
    """``records`` with ``attack_rank``: 1 for the first attack of its name in the run, 2 for a second
    one (the same attack with other options), and so on."""
    records = records.copy()
    records["attack_rank"] = records.groupby("attack")["attack_index"].rank(method="dense").astype(int)
    return records


def _show(value) -> str:
    return "NA" if pd.isna(value) else str(value)


def select_entries(entries_dir: str | Path, names: list[str] | None = None) -> list[dict]:
    """The stored entries named by file stem (MODEL__DATASET__TRACK) or model name; every one without names."""
    entries_dir = Path(entries_dir)
    entries = load_entries(entries_dir)
    if not names:
        return entries
    known = {entry_stem(entry["model"], entry["dataset"], entry["track"]): entry for entry in entries}
    missing = [name for name in names if name not in known and not any(entry["model"] == name for entry in entries)]
    if missing:
        raise InvarbenchError(
            f"no leaderboard entry named {', '.join(missing)} in {entries_dir}; use an entry file's stem"
            " (MODEL__DATASET__TRACK) or a model name"
        )
    return [entry for stem, entry in known.items() if stem in names or entry["model"] in names]


def check_entries(
    entries_dir: str | Path = ENTRIES_DIR,
    *,
    names: list[str] | None = None,
    points: int | None = None,
    update: bool = False,
    progress: bool = False,
    device: str | None = None,
) -> list[CheckResult]:
    entries_dir = Path(entries_dir)
    entries = select_entries(entries_dir, names)
    if device is not None:
        resolve_device(device)
    return [
        check_entry(entry, entries_dir, points=points, update=update, progress=progress, device=device)
        for entry in entries
    ]


__all__ = ["CheckResult", "check_entries", "check_entry", "select_entries"]
