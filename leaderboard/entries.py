"""Leaderboard entries: one JSON per model, data set and track, written only from a finished run.

``invarbench leaderboard add RUN_DIR`` turns a run's manifest, summary and per-sample records into
``leaderboard/entries/MODEL__DATASET__TRACK.json`` (numbers plus the settings that produced them:
attacks and options, eps, N, seed, checkpoint sha256, package versions, date) and the records of the
regression subset (the first ``regression_points`` points) beside it as Parquet. An entry for the
same model, data set and track made with other settings is refused unless replacing is asked for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from invarbench.errors import ConfigError
from invarbench.gallery import invariance_gallery, perturbation_gallery
from invarbench.io import atomic_write
from invarbench.leaderboard import ENTRIES_DIR
from invarbench.models import get_card, list_models
from invarbench.models.external import is_robustbench
from invarbench.store import RunStore, as_records, read_json, read_records, write_json
from invarbench.tracks import INVARIANCE, PERTURBATION, TRACKS, get_track

SCHEMA = 1
REQUIRED = (
    "schema",
    "model",
    "dataset",
    "track",
    "checkpoint_sha256",
    "settings",
    "versions",
    "date",
    "results",
    "regression",
)


def entry_stem(model: str, dataset: str, track: str) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", part) for part in (model, dataset, track))


def entries_from_run(run_dir: str | Path, *, regression_points: int = 200) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """The entries a finished run gives: (entry, regression records) per model and track present."""
    run_dir = Path(run_dir)
    store = RunStore(run_dir)
    for path in (store.manifest_path, store.summary_path, store.results_path):
        if not path.exists():
            raise ConfigError(
                f"{run_dir} is not a finished invarbench run ({path.name} is missing); finish it by re-running its"
                " command, then add it"
            )
    manifest = read_json(store.manifest_path)
    if manifest.get("status") != "complete":
        raise ConfigError(
            f"the run in {run_dir} has status {manifest.get('status')!r}, not 'complete'; re-run its command to finish"
            " it, then add it"
        )
    summary = read_json(store.summary_path)
    config = manifest["config"]
    rewrite = (
        f"re-run the command recorded in {store.manifest_path} to rewrite it from the job records, then add the run"
    )
    records_of = {
        track: read_records(run_dir / track.records_file, fix=rewrite, columns=track.columns)
        for track in TRACKS.values()
        if (run_dir / track.records_file).exists()
    }
    registered = set(list_models(role=None))
    entries = []
    for model_config in config["models"]:
        key = model_config["key"]
        if str(model_config["reference"]).startswith("in-memory:"):
            raise ConfigError(
                f"the run in {run_dir} evaluated the in-memory model {key}, which `invarbench check` could not load"
                " again; save it (torch.jit.save, ONNX, or a card in models/cards) and run it from that file to make a"
                " leaderboard entry"
            )
        model_summary = summary["models"][key]
        card = get_card(model_config["reference"]) if model_config["reference"] in registered else None
        description = {
            "architecture": (
                card.architecture
                if card
                else model_config.get("architecture")
                or ("RobustBench zoo" if is_robustbench(model_config["reference"]) else "user checkpoint")
            ),
            "recipe": card.training["recipe"] if card else "unknown",
            "trained_against": (
                "none"
                if not card or card.threat_model["norm"] == "none"
                else f"{card.threat_model['norm']} {card.threat_model['eps']:g}"
            ),
            "invertible": bool(card.invertible) if card else False,
        }
        for track in TRACKS.values():
            attacks = track.attacks(config["attacks"])
            if not attacks:
                continue
            records = records_of.get(track)
            if records is None:
                raise ConfigError(
                    f"the run in {run_dir} configured {track.name} attacks but has no {track.records_file}; it was not"
                    " written by this version of invarbench"
                )
            results = {
                "clean_accuracy": model_summary["clean_accuracy"],
                "clean_correct": model_summary["clean_correct"],
                "checks": model_summary["checks"],
                "warnings": model_summary["warnings"],
            }
            if "attack_warnings" in model_summary:
                results["attack_warnings"] = model_summary["attack_warnings"]
            results.update(
                track.entry_results(model_summary, summary, records[records["model"] == key], attacks, config["n"])
            )
            # Whole shards only: a job's seed and batch are those of its shard, so a re-run of the same
            # shards reproduces deterministic attacks exactly.
            shard_size = config["shard_size"]
            points = min(config["n"], -(-regression_points // shard_size) * shard_size)
            subset = records[(records["model"] == key) & (records["index"] < points)]
            stem = entry_stem(key, model_config["dataset"], track.name)
            entry = {
                "schema": SCHEMA,
                "model": key,
                "reference": model_config["reference"],
                "dataset": model_config["dataset"],
                "track": track.name,
                "checkpoint_sha256": model_summary["checkpoint_sha256"],
                "model_card": description,
                "settings": {
                    "n": config["n"],
                    "seed": config["seed"],
                    "cascade": config["cascade"],
                    "shard_size": config["shard_size"],
                    "threats": config["threats"],
                    "attacks": attacks,
                    **track.entry_settings(config, summary),
                    **_executor_setting(summary),
                },
                "versions": manifest["versions"],
                "date": manifest.get("finished", manifest["created"]),
                "device": manifest["device"],
                **(
                    {"machine": {key: manifest[key] for key in ("threads", "cpu", "platform") if key in manifest}}
                    if "cpu" in manifest
                    else {}
                ),
                "results": results,
                "regression": {"file": f"{stem}.parquet", "points": points},
            }
            entries.append((entry, subset))
    return entries


# Settings that record how a run was executed, not what it computed: entries that differ only in them agree.
EXECUTION_SETTINGS = ("executor", "workers")


def _executor_setting(summary: dict[str, Any]) -> dict[str, Any]:
    """Where the run's jobs ran (``local`` or ``ray``) and on how many workers; runs made before the
    executors existed record neither."""
    return {key: summary[key] for key in EXECUTION_SETTINGS if key in summary}


def _computed_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in settings.items() if key not in EXECUTION_SETTINGS}


def curve_robust_accuracy(curve: dict[str, Any], eps: float) -> float:
    """Robust accuracy at ``eps`` from a stored minimum-norm curve: points the attack ran on (the
    correctly classified ones) whose smallest adversarial norm is larger than eps, over n."""
    import bisect

    broken = bisect.bisect_right(curve["minimal_norms"], eps * (1 + 1e-5))
    return (curve["attacked"] - broken) / curve["n"]


def curve_median_norm(curve: dict[str, Any]) -> float:
    """The median over all n points of the smallest adversarial norm the minimum-norm attack found:
    0 for points misclassified without perturbation, +inf where it found none. Robust accuracy under
    that attack alone falls to one half at this eps."""
    values = (
        [0.0] * (curve["n"] - curve["attacked"]) + list(curve["minimal_norms"]) + [float("inf")] * curve["not_found"]
    )
    return values[(len(values) - 1) // 2]


def add_run(
    run_dir: str | Path,
    entries_dir: str | Path = ENTRIES_DIR,
    *,
    replace: bool = False,
    regression_points: int = 200,
    tracks: tuple[str, ...] | None = None,
    galleries: bool = True,
) -> list[Path]:
    """Write the run's entries; refuse conflicting ones (other settings or checkpoint) unless ``replace``.

    ``tracks`` keeps only those tracks' entries (default: every track the run has), e.g. the
    invariance entry of a run whose PGD is there only to sit beside it. ``galleries`` also draws the
    perturbation entries' adversarial examples (recomputed on the first shard, see
    :func:`invarbench.gallery.perturbation_gallery`); invariance galleries come from the run's images."""
    entries_dir = Path(entries_dir)
    found = entries_from_run(run_dir, regression_points=regression_points)
    if tracks is not None:
        for name in tracks:
            get_track(name)
        absent = sorted(set(tracks) - {entry["track"] for entry, _ in found})
        if absent:
            raise ConfigError(
                f"the run in {run_dir} has no {', '.join(absent)} attacks, so no such entry; drop --track {absent[0]}"
            )
        found = [(entry, subset) for entry, subset in found if entry["track"] in tracks]
    for entry, _ in found:
        path = entries_dir / f"{entry_stem(entry['model'], entry['dataset'], entry['track'])}.json"
        if path.exists() and not replace:
            existing = read_entry(path)
            # How the run was executed (local or Ray, workers) does not change its results: not a conflict.
            for field, (old, new) in {
                "settings": (_computed_settings(existing["settings"]), _computed_settings(entry["settings"])),
                "checkpoint_sha256": (existing["checkpoint_sha256"], entry["checkpoint_sha256"]),
            }.items():
                if old != new:
                    raise ConfigError(
                        f"{path} holds {entry['model']} ({entry['track']}) with other {field} than the run in"
                        f" {run_dir}; pass --replace to overwrite it, or evaluate with the stored settings"
                    )
    written = []
    for entry, subset in found:
        stem = entry_stem(entry["model"], entry["dataset"], entry["track"])
        track = get_track(entry["track"])
        if track is INVARIANCE:
            # Galleries need the candidate images, which only the run directory holds.
            for attack in sorted({attack["name"] for attack in entry["settings"]["attacks"]}):
                try:
                    written.append(
                        invariance_gallery(
                            run_dir,
                            entries_dir / f"{stem}__{attack}.gallery.png",
                            model=entry["model"],
                            attack=attack,
                            count=6,
                        )
                    )
                except ConfigError:
                    pass
        atomic_write(
            entries_dir / f"{stem}.parquet",
            lambda tmp, subset=subset, track=track: as_records(subset, track.columns).to_parquet(tmp, index=False),
        )
        path = entries_dir / f"{stem}.json"
        write_json(path, entry)
        written.append(path)
        if track is PERTURBATION and galleries:
            # Recomputed from the entry's first shard and checked against its stored records (on disk now).
            try:
                written.append(
                    perturbation_gallery(
                        entry,
                        entries_dir,
                        entries_dir / f"{stem}__{entry['settings']['attacks'][0]['name']}.gallery.png",
                    )
                )
            except ConfigError:
                pass
    return written


def read_entry(path: Path) -> dict[str, Any]:
    restore = (
        f"restore it from git (`git checkout {path}`) or re-add its run with `invarbench leaderboard add RUN_DIR"
        " --replace`"
    )
    entry = read_json(path, fix=restore)
    if not isinstance(entry, dict):
        raise ConfigError(f"leaderboard entry {path} holds a JSON {type(entry).__name__}, not an object; {restore}")
    missing = [field for field in REQUIRED if field not in entry]
    if missing:
        raise ConfigError(
            f"leaderboard entry {path} lacks {', '.join(missing)}; entries are written by `invarbench leaderboard add"
            " RUN_DIR`, never by hand: re-add its run"
        )
    if entry["schema"] != SCHEMA:
        raise ConfigError(
            f"leaderboard entry {path} has schema {entry['schema']}, this invarbench reads {SCHEMA}; re-add its run"
        )
    if entry["track"] not in TRACKS:
        raise ConfigError(f"leaderboard entry {path} has track {entry['track']!r}; expected one of {', '.join(TRACKS)}")
    return entry


def load_entries(entries_dir: str | Path = ENTRIES_DIR) -> list[dict[str, Any]]:
    return [read_entry(path) for path in sorted(Path(entries_dir).glob("*.json"))]
