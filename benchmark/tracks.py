"""Tracks: the kinds of evaluation, each an object that owns its part of a run, an entry and a check.

Every attack belongs to one track: its class's ``track`` names a registered :class:`Track`. The
``perturbation`` track looks for small changes that keep the true label and flip the model's prediction;
the ``invariance`` track for changes that flip the true label (judged by an oracle) while the model's
prediction stays put. A track owns:

- planning: the threat models (or budgets) each of its attacks runs under (:meth:`Track.threats`), and
  whether its jobs form the cascade (:attr:`Track.cascades`);
- execution: how one of its jobs turns a shard into records (:meth:`Track.execute`), and what its jobs
  need beyond the model (:meth:`Track.needs_oracle`, :attr:`Track.needs_dataset`);
- its records: their columns, the file of a finished run that holds them and their order;
- its section of a run's summary (:meth:`Track.summarize_model`, :meth:`Track.summarize_run`);
- the fields of its leaderboard entries (:meth:`Track.entry_results`, :meth:`Track.entry_settings`);
- what ``invarbench check`` compares per point (:attr:`Track.compared`), whose margins it watches
  (:attr:`Track.margin`) and which rates it holds (:meth:`Track.rates`).

The runner, the executors, the leaderboard and the check ask an attack's track (:func:`track_of`)
instead of testing names. A new track is one module with a :class:`Track` subclass, its attacks (with
``track`` set to its name) and :func:`register_track`; tests/test_tracks.py adds one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch

from invarbench.attacks import ATTACKS, InvarianceAttack, InvarianceContext, ThreatModel
from invarbench.config import AttackSpec, RunConfig
from invarbench.errors import ConfigError
from invarbench.io import invarbench_home
from invarbench.jobs import Job, JobOutput, JobTask, execute_invariance_job, execute_job
from invarbench.metrics import invariance_section, minimum_norm_curves, robustness_section, tally
from invarbench.oracles import Oracle
from invarbench.store import INVARIANCE_COLUMNS, RECORD_COLUMNS, as_records

TRACKS: dict[str, Track] = {}


class Track:
    """One kind of evaluation; subclasses override what differs. Registered by :func:`register_track`."""

    #: The name attacks, entries (``MODEL__DATASET__TRACK``) and ``--track`` know it by.
    name: ClassVar[str]
    #: The records' columns and dtypes (see ``invarbench.store``).
    columns: ClassVar[dict[str, str]]
    #: The file of a run directory that holds every record of the track once the run is complete.
    records_file: ClassVar[str]
    #: The order of a run's records (every record of the track, whichever order its jobs finished in).
    order: ClassVar[tuple[str, ...]]
    #: Whether a run writes its records file even when it ran none of the track's attacks.
    always_written: ClassVar[bool] = False
    #: Whether the track's jobs of one shard and norm form a cascade (each attack on what the ones before left).
    cascades: ClassVar[bool] = False
    #: Whether its jobs need the data set (beyond their shard's points).
    needs_dataset: ClassVar[bool] = False
    #: The columns ``invarbench check`` compares point by point, and the margin column whose drift it watches.
    compared: ClassVar[tuple[str, ...]]
    margin: ClassVar[str | None] = None

    # ------------------------------------------------------------------------------------------ a run
    def threats(self, attack: AttackSpec, threats: tuple[ThreatModel, ...], invertible: bool) -> list[ThreatModel]:
        """The threat models ``attack`` runs under, one job per threat model and shard: every configured one."""
        return list(threats)

    def needs_oracle(self, attack: AttackSpec) -> bool:
        """Whether ``attack``'s jobs need an oracle to judge their candidates."""
        return False

    def execute(
        self,
        task: JobTask,
        model: torch.nn.Module,
        earlier: list[pd.DataFrame],
        *,
        dataset: Any = None,
        oracle: Oracle | None = None,
        workspace: Path | None = None,
    ) -> JobOutput:
        """Run one job on its shard; ``earlier`` holds the records of the jobs it reads (the cascade)."""
        raise NotImplementedError

    def progress(self, job: Job, records: pd.DataFrame, tallies: dict[tuple, list[int]]) -> str:
        """The progress bar's note on a finished job."""
        return f"{job.model} {job.attack.name}"

    def records(self, frames: list[pd.DataFrame]) -> pd.DataFrame | None:
        """A run's records of this track, in :attr:`order`; None when it has none (and need not write them)."""
        if not frames and not self.always_written:
            return None
        empty = pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in self.columns.items()})
        records = as_records(pd.concat(frames, ignore_index=True) if frames else empty, self.columns)
        return records.sort_values(list(self.order), kind="stable")

    def summarize_run(self, config: RunConfig) -> dict[str, Any]:
        """Keys of the run's summary that belong to the track."""
        return {}

    def summarize_model(
        self, records: pd.DataFrame | None, config: RunConfig, model: str, clean_correct: int
    ) -> dict[str, Any]:
        """Keys of one model's summary that belong to the track."""
        return {}

    # ------------------------------------------------------------------------------------ an entry
    def attacks(self, configured: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The attacks of a run's stored configuration that belong to the track."""
        return [attack for attack in configured if track_of(attack["name"]) is self]

    def entry_results(
        self,
        model_summary: dict[str, Any],
        summary: dict[str, Any],
        records: pd.DataFrame,
        attacks: list[dict[str, Any]],
        n: int,
    ) -> dict[str, Any]:
        """The track's figures of an entry (beside clean accuracy, checks and warnings)."""
        return {}

    def entry_settings(self, config: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
        """Settings of an entry that belong to the track (beside attacks, eps, N, seed ...)."""
        return {}

    # ------------------------------------------------------------------------------------ a check
    def per_point(self, attack: str) -> bool:
        """Whether a check compares ``attack``'s records point by point (else only its rates)."""
        return True

    def rates(self, group: pd.DataFrame) -> Iterator[tuple[str, float, float]]:
        """(name, stored, new) for each rate a check holds over a group of paired records."""
        return iter(())


def register_track(track: Track) -> Track:
    """Make ``track`` known by its name (to attacks whose ``track`` names it, entries and checks)."""
    TRACKS[track.name] = track
    return track


def track_of(attack: AttackSpec | str) -> Track:
    """The track of an attack (a spec or a registered name)."""
    name = attack if isinstance(attack, str) else attack.name
    return get_track(ATTACKS[name].track)


def get_track(name: str) -> Track:
    if name not in TRACKS:
        raise ConfigError(f"unknown track {name}; use {' or '.join(TRACKS)}")
    return TRACKS[name]


class PerturbationTrack(Track):
    """Small changes within a norm ball that keep the true label and flip the model's prediction."""

    name = "perturbation"
    columns = RECORD_COLUMNS
    records_file = "results.parquet"
    order = ("model", "norm", "eps", "attack_index", "index")
    always_written = True
    cascades = True
    compared = ("success", "adversarial_prediction")
    margin = "logit_margin"

    def threats(self, attack: AttackSpec, threats: tuple[ThreatModel, ...], invertible: bool) -> list[ThreatModel]:
        """Every configured threat model, or only the eps values the attack is restricted to (``eps=``)."""
        only = attack.only_epsilons
        if only is None:
            return list(threats)

        def wanted(eps: float) -> bool:
            return any(abs(eps - value) < 1e-12 for value in only)

        restricted = [
            ThreatModel(threat.norm, tuple(eps for eps in threat.epsilons if wanted(eps))) for threat in threats
        ]
        unknown = [eps for eps in only if not any(abs(eps - value) < 1e-12 for t in threats for value in t.epsilons)]
        if unknown:
            raise ConfigError(
                f"attack {attack.label()!r} asks for eps {unknown}, which no --threat configures; add them to a"
                " --threat or drop them from eps="
            )
        return [threat for threat in restricted if threat.epsilons]

    def execute(self, task, model, earlier, *, dataset=None, oracle=None, workspace=None) -> JobOutput:
        previous = pd.concat(earlier) if earlier else None
        job = task.job
        records, warnings = execute_job(
            job,
            model,
            task.images,
            task.labels,
            task.clean_predictions,
            previous,
            cascade=task.cascade,
            workspace=workspace,
        )
        return JobOutput(records, 0.0, warnings)

    def progress(self, job: Job, records: pd.DataFrame, tallies: dict[tuple, list[int]]) -> str:
        return f"{job.model} {job.threat.norm} {job.attack.name} robust {tally(tallies, job, records)}"

    def summarize_run(self, config: RunConfig) -> dict[str, Any]:
        return {"attack_order": [attack.label() for _, attack in _attacks_of(self, config)]}

    def summarize_model(self, records, config, model, clean_correct) -> dict[str, Any]:
        attacks = _attacks_of(self, config)
        assert records is not None, "the perturbation track's records are always written"
        return {"threats": robustness_section(records[records["model"] == model], config, attacks, clean_correct)}

    def entry_results(self, model_summary, summary, records, attacks, n) -> dict[str, Any]:
        results = {"threats": model_summary["threats"], "attack_order": summary["attack_order"]}
        curves = minimum_norm_curves(records, attacks, n)
        return {**results, "curves": curves} if curves else results

    def per_point(self, attack: str) -> bool:
        return ATTACKS[attack].deterministic

    def rates(self, group: pd.DataFrame) -> Iterator[tuple[str, float, float]]:
        stored, new = (group[f"success_{side}"].fillna(False).astype(bool).mean() for side in ("stored", "new"))
        yield "attack success rate", stored, new


class InvarianceTrack(Track):
    """Changes that flip the true label, judged by an oracle, while the model's prediction may stay put."""

    name = "invariance"
    columns = INVARIANCE_COLUMNS
    records_file = "invariance.parquet"
    order = ("model", "attack_index", "norm", "eps", "index")
    needs_dataset = True
    compared = ("target_class", "oracle_label", "model_prediction")
    margin = "model_margin"

    def threats(self, attack: AttackSpec, threats: tuple[ThreatModel, ...], invertible: bool) -> list[ThreatModel]:
        """The threat models the attack's norm allows, one per norm (exact metamers and l_0 budgets once,
        as their own pseudo-norm)."""
        instance = attack.create()
        selected: list[ThreatModel] = []
        for threat in threats:
            budgets = instance.budgets(threat, invertible)
            if not budgets:
                continue
            # A job runs one norm (or pseudo-norm) at every budget of it.
            candidate = ThreatModel(budgets[0].norm, tuple(budget.value for budget in budgets))
            if candidate not in selected:
                selected.append(candidate)
        return selected

    def needs_oracle(self, attack: AttackSpec) -> bool:
        attack_class = ATTACKS[attack.name]
        return issubclass(attack_class, InvarianceAttack) and attack_class.needs_oracle

    def execute(self, task, model, earlier, *, dataset=None, oracle=None, workspace=None) -> JobOutput:
        job = task.job
        context = InvarianceContext(
            dataset, oracle, torch.arange(job.start, job.stop), cache_dir=invarbench_home() / "cache" / "invariance"
        )
        records, candidates = execute_invariance_job(
            job, model, task.images, task.labels, task.clean_predictions, context
        )
        return JobOutput(records, 0.0, candidates=candidates)

    def progress(self, job: Job, records: pd.DataFrame, tallies: dict[tuple, list[int]]) -> str:
        judged = records[records["oracle_label"].notna() & (records["oracle_label"] != records["label"])]
        return f"{job.model} {job.attack.name} label changed {len(judged)}/{len(records)}"

    def summarize_model(self, records, config, model, clean_correct) -> dict[str, Any]:
        if records is None or not len(records):
            return {}
        return {"invariance": invariance_section(records[records["model"] == model], config)}

    def entry_results(self, model_summary, summary, records, attacks, n) -> dict[str, Any]:
        return {"invariance": model_summary.get("invariance", {}), "oracles": summary.get("oracles", {})}

    def entry_settings(self, config: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
        """The oracle that judged the entry, by name, so that a check re-judges with the same one."""
        names = sorted(summary.get("oracles", {}))
        chosen = config.get("oracle") or (names[0] if len(names) == 1 else None)
        return {"oracle": chosen} if chosen else {}

    def rates(self, group: pd.DataFrame) -> Iterator[tuple[str, float, float]]:
        rates: dict[str, list[float]] = {
            "abstention rate": [],
            "label-changed rate": [],
            "rate of changed labels the model follows": [],
        }
        for side in ("stored", "new"):
            oracle = group[f"oracle_label_{side}"].astype("object")
            changed = oracle.notna() & (oracle.fillna(-1) != group["label_stored"])
            follows = changed & (group[f"model_prediction_{side}"].astype("object").fillna(-2) == oracle.fillna(-1))
            for name, values in zip(rates, (oracle.isna(), changed, follows)):
                rates[name].append(float(values.mean()))
        for name, (stored, new) in rates.items():
            yield name, stored, new


def _attacks_of(track: Track, config: RunConfig) -> list[tuple[int, AttackSpec]]:
    """(position in the run, spec) of the run's attacks that belong to ``track``."""
    return [(index, attack) for index, attack in enumerate(config.attacks) if track_of(attack) is track]


def summarize(records: dict[Track, pd.DataFrame | None], config: RunConfig, models: dict[str, dict[str, Any]]) -> dict:
    """A run's summary: per model, its clean accuracy and each track's section (``records``: every record
    of each track, None for a track the run has none of and need not write)."""
    summary: dict[str, Any] = {"n": config.n, "seed": config.seed, "cascade": config.cascade, "models": {}}
    for track in TRACKS.values():
        summary.update(track.summarize_run(config))
    for model, info in models.items():
        entry = {**info, "clean_accuracy": info["clean_correct"] / config.n}
        for track, track_records in records.items():
            entry.update(track.summarize_model(track_records, config, model, info["clean_correct"]))
        summary["models"][model] = entry
    return summary


PERTURBATION = register_track(PerturbationTrack())
INVARIANCE = register_track(InvarianceTrack())
