"""The runner: plan models x threat models x attacks x shards into jobs, run them, store the records.

``run_benchmark`` reads top-down: check the inputs (loading each registered model once), take the run
directory, load the data sets, models and oracles, plan the jobs, run the unfinished ones on an executor
(``invarbench.executors``: in this process, or as Ray tasks), store each job's records as it finishes,
then aggregate every track's records (``invarbench.tracks``) into the results files and the summary.

Jobs are pure: a job's records depend only on the job (with its derived seed), the model, the shard's
points and, in the cascade, the records of the cheaper attacks on the same shard. So finished jobs are
skipped on resume, and an executor can run them anywhere; the runner alone writes the run directory,
from the results the executor hands back.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from invarbench import oracles
from invarbench.checks import CHECKS, check_compatible, check_model
from invarbench.config import ModelSpec, RunConfig
from invarbench.datasets import Dataset, load_dataset
from invarbench.environment import cpu_description, package_versions, resolve_device
from invarbench.errors import ConfigError
from invarbench.evaluation import predict
from invarbench.executors import ExecutorSettings, ModelInputs, create_executor
from invarbench.jobs import Job, JobTask
from invarbench.metrics import oracle_report
from invarbench.models import BenchmarkModel, get_card
from invarbench.plan import plan
from invarbench.preflight import check_guides, check_models, check_run_dir, discarded_on_failure
from invarbench.store import RunLock, RunStore, read_json, write_json
from invarbench.tracks import TRACKS, summarize, track_of


@dataclass
class RunOutcome:
    run_dir: Path
    summary: dict[str, Any]
    jobs_run: int = 0
    jobs_resumed: int = 0
    timings: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class _Loaded:
    """One model as the run evaluates it: its shared job inputs, its evaluation points and what the
    summary says of it."""

    inputs: ModelInputs
    images: Any
    labels: Any
    clean_predictions: Any
    info: dict[str, Any]


def run_benchmark(
    config: RunConfig,
    out: Path,
    *,
    name: str | None = None,
    device: str = "auto",
    progress: bool = True,
    data_source: str | None = None,
    oracle: oracles.Oracle | None = None,
    executor: ExecutorSettings | None = None,
) -> RunOutcome:
    """Run (or resume) the configured evaluation into ``out/NAME`` and return its summary.

    ``oracle`` judges invariance candidates; by default the configured one, else the data set's own (see
    ``invarbench.oracles.resolve``). ``executor`` says where the jobs run (default: in this process).
    """
    run_dir = Path(out) / (name or config.default_name())
    store = RunStore(run_dir)
    settings = executor or ExecutorSettings()
    if settings.name == "ray" and device == "cuda":
        raise ConfigError(
            "--executor ray runs jobs on the workers' CPUs; use --device cpu (or auto), or the local executor for CUDA"
        )
    torch_device = resolve_device("cpu" if settings.name == "ray" else device)
    registered = check_models(config)
    check_guides(config, oracle)
    # Started (Ray joined) before the run directory is touched: an unreachable cluster leaves no files.
    with (
        create_executor(settings) as executor_run,
        RunLock(run_dir) as lock,
        discarded_on_failure(store, created=run_dir in lock.created),
    ):
        store.remove_stale_temporaries()
        check_run_dir(store, config)
        manifest = _manifest(store, config, str(torch_device), executor_run, settings)
        write_json(store.manifest_path, manifest)

        loaded, oracle_reports = _load(config, registered, torch_device, data_source, oracle)
        jobs = plan(config)
        outcome = RunOutcome(run_dir, {})
        records_of: dict[str, pd.DataFrame] = {}
        seconds_of: dict[str, float] = {}
        tasks = []
        for job, task in _tasks(config, jobs, loaded):
            if store.job_done(job.id):
                records_of[job.id], seconds_of[job.id] = store.read_job(job.id, track_of(job.attack).columns)
                outcome.jobs_resumed += 1
            else:
                tasks.append(task)
        resumed_points = sum(job.stop - job.start for job in jobs if job.id in records_of)
        # Started once every model, data set and oracle has loaded and passed its checks: an input error
        # is the only thing printed.
        bar = tqdm(
            total=sum(job.stop - job.start for job in jobs),
            initial=resumed_points,
            desc="invarbench run",
            unit="pt",
            disable=not progress,
            dynamic_ncols=True,
        )
        tallies: dict[tuple, list[int]] = {}
        driver_seconds = 0.0  # the driver's own time per finished job: storing it, progress (manifest: driver_seconds)
        started = time.perf_counter()
        inputs = {key: model.inputs for key, model in loaded.items()}
        finished = executor_run.run(tasks, inputs, dict(records_of), workspace=lambda job: run_dir / "state" / job.id)
        with contextlib.closing(finished):
            for task, output in finished:
                began = time.perf_counter()
                job = task.job
                _store_job(store, job, output)
                records_of[job.id], seconds_of[job.id] = output.records, output.seconds
                outcome.jobs_run += 1
                bar.update(job.stop - job.start)
                bar.set_postfix_str(track_of(job.attack).progress(job, output.records, tallies), refresh=False)
                driver_seconds += time.perf_counter() - began
        jobs_wall_seconds = time.perf_counter() - started
        bar.close()

        info = {key: model.info for key, model in loaded.items()}
        outcome.timings = _timings_and_warnings(config, jobs, seconds_of, store, info)
        records = {
            track: track.records([records_of[job.id] for job in jobs if track_of(job.attack) is track])
            for track in TRACKS.values()
        }
        for track, track_records in records.items():
            if track_records is not None:
                store.write_records(track.records_file, track_records)
        outcome.summary = summarize(records, config, info)
        outcome.summary.update(executor=executor_run.name, workers=executor_run.workers)
        if oracle_reports:
            outcome.summary["oracles"] = oracle_reports
        write_json(store.summary_path, outcome.summary)
        manifest.update(
            status="complete",
            finished=datetime.now(UTC).isoformat(timespec="seconds"),
            timings_seconds=outcome.timings,
            jobs_wall_seconds=jobs_wall_seconds,
            driver_seconds=driver_seconds,
            checkpoint_sha256={key: model["checkpoint_sha256"] for key, model in info.items()},
        )
        write_json(store.manifest_path, manifest)
    return outcome


def _manifest(store: RunStore, config: RunConfig, device: str, executor_run, settings: ExecutorSettings) -> dict:
    """The manifest of a run as it starts (``status: running``), keeping the first start's date on resume."""
    manifest = {
        "config": config.to_dict(),
        "config_sha256": config.digest(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "status": "running",
        "versions": package_versions(),
        "device": device,
        "threads": executor_run.threads_per_worker,
        "executor": {
            "name": executor_run.name,
            "workers": executor_run.workers,
            "threads_per_worker": executor_run.threads_per_worker,
            **({"address": settings.address} if settings.address else {}),
        },
        "cpu": cpu_description(),
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
    }
    if store.manifest_path.exists():
        manifest["created"] = read_json(store.manifest_path).get("created", manifest["created"])
    return manifest


def _load(
    config: RunConfig,
    registered: dict[str, BenchmarkModel],
    device,
    data_source: str | None,
    oracle: oracles.Oracle | None,
) -> tuple[dict[str, _Loaded], dict[str, dict[str, Any]]]:
    """Every model on ``device`` with its data set's evaluation points, clean predictions, checks and (where
    an attack needs one) its oracle; and the report of each oracle on the unchanged points."""
    datasets: dict[tuple, Dataset] = {}
    judges: dict[tuple, oracles.Oracle] = {}
    reports: dict[str, dict[str, Any]] = {}
    loaded = {}
    needs_oracle = any(track_of(attack).needs_oracle(attack) for attack in config.attacks)
    for spec in config.models:
        card = get_card(spec.reference) if spec.is_registered else None
        dataset_options = card.dataset_options if card else {}
        key = (spec.dataset, tuple(sorted(dataset_options.items())))
        if key not in datasets:
            source = {"source": data_source} if spec.dataset in ("mnist", "cifar10") else {}
            datasets[key] = load_dataset(spec.dataset, **source, **dataset_options)
        dataset = datasets[key]
        images, labels = dataset.evaluation_subset(config.n)
        model = registered.get(spec.key) or spec.load(dataset.num_classes, dataset.bounds)
        model = model.to(device).eval()
        info = _check(spec, model, dataset, images, labels, config)
        clean_predictions = predict(model, images)
        info["clean_correct"] = int((clean_predictions == labels).sum())
        if needs_oracle and key not in judges:
            judges[key] = (oracle or oracles.resolve(config.oracle, dataset)).to(device)
            reports[judges[key].name] = oracle_report(judges[key], images, labels)
        inputs = ModelInputs(
            spec, model, dataset.num_classes, dataset.bounds, info["checkpoint_sha256"], dataset, judges.get(key)
        )
        loaded[spec.key] = _Loaded(inputs, images, labels, clean_predictions, info)
    return loaded, reports


def _check(spec: ModelSpec, model: BenchmarkModel, dataset: Dataset, images, labels, config: RunConfig) -> dict:
    """A model's fit to its data set and threat models (errors), and its checks (flags the summary keeps)."""
    check_compatible(model, dataset, source=spec.reference)
    for threat in config.threats:
        threat.check_against_bounds(model.bounds, images[0].numel(), source=spec.key)
    first = min(100, config.n)
    flags = check_model(model, images[:first], labels[:first], num_classes=dataset.num_classes, source=spec.reference)
    return {
        "reference": spec.reference,
        "dataset": spec.dataset,
        "checkpoint_sha256": spec.checkpoint_sha256(),
        "checks": flags,
        "warnings": [CHECKS[check] for check, raised in flags.items() if raised],
    }


def _tasks(config: RunConfig, jobs: list[Job], loaded: dict[str, _Loaded]):
    """(job, task) for every job in plan order: the task carries the job's shard and the ids of the jobs
    whose records it reads (the cheaper attacks of its track's cascade on the same shard and norm)."""
    # Per norm, not per threat: an attack restricted to some eps (eps=...) still sees what the attacks
    # before it found at those eps.
    chains: dict[tuple, list[str]] = {}
    for job in jobs:
        earlier: tuple[str, ...] = ()
        if track_of(job.attack).cascades:
            chain = chains.setdefault((job.model, job.threat.norm, job.shard), [])
            earlier = tuple(chain) if config.cascade and job.attack.cascades else ()
            chain.append(job.id)
        model = loaded[job.model]
        window = slice(job.start, job.stop)
        task = JobTask(
            job, model.images[window], model.labels[window], model.clean_predictions[window], config.cascade, earlier
        )
        yield job, task


def _store_job(store: RunStore, job: Job, output) -> None:
    """A finished job's candidates and records (atomically: the records mark it done)."""
    if output.candidates is not None:
        store.write_candidates(job.id, output.candidates)
    columns = track_of(job.attack).columns
    store.write_job(job.id, output.records, seconds=output.seconds, warnings=output.warnings, columns=columns)
    # An attack's resume state is only needed until its job's records are on disk.
    shutil.rmtree(store.run_dir / "state" / job.id, ignore_errors=True)


def _timings_and_warnings(
    config: RunConfig, jobs: list[Job], seconds_of: dict[str, float], store: RunStore, info: dict[str, dict]
) -> dict[str, dict[str, float]]:
    """Seconds per model and attack, in plan order; each model's ``attack_warnings`` (per attack, each
    distinct warning its jobs raised, in order, e.g. AutoAttack's Square check) added to ``info``."""
    timings: dict[str, dict[str, float]] = {}
    attack_warnings: dict[str, dict[str, dict[str, None]]] = {spec.key: {} for spec in config.models}
    for job in jobs:
        per_model = timings.setdefault(job.model, {})
        per_model[job.attack.label()] = per_model.get(job.attack.label(), 0.0) + seconds_of[job.id]
        for warning in store.job_warnings(job.id):
            attack_warnings[job.model].setdefault(job.attack.label(), {})[f"{job.threat.norm} {warning}"] = None
    for spec in config.models:
        timings.setdefault(spec.key, {})
        info[spec.key]["attack_warnings"] = {label: list(found) for label, found in attack_warnings[spec.key].items()}
    return timings


__all__ = ["RunOutcome", "run_benchmark"]
