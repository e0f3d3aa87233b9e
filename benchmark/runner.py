"""The runner: plan models x threat models x attacks x shards into jobs, run them, store the records.

Jobs are pure: a job's records depend only on the job (with its derived seed), the model, the shard's
points and, in the cascade, the records of the cheaper attacks on the same shard. So finished jobs can
be skipped on resume, and an executor (``invarbench.executors``: in this process, or as Ray tasks on a
cluster) can run them anywhere; the runner alone writes the run directory, from the records they hand back.
"""

from __future__ import annotations

import platform
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from invarbench import oracles
from invarbench.attacks import ATTACKS
from invarbench.checks import CHECKS, check_compatible, check_model
from invarbench.config import RunConfig
from invarbench.datasets import load_dataset
from invarbench.environment import cpu_description, package_versions, resolve_device
from invarbench.errors import ConfigError
from invarbench.evaluation import predict
from invarbench.executors import ExecutorSettings, JobOutput, JobTask, ModelInputs, create_executor
from invarbench.metrics import _tally, oracle_report, summarize
from invarbench.models import get_card
from invarbench.plan import plan
from invarbench.preflight import check_guides, check_models, check_run_dir, discarded_on_failure
from invarbench.store import RECORD_COLUMNS, RunLock, RunStore, as_records, read_json, write_json


@dataclass
class RunOutcome:
    run_dir: Path
    summary: dict[str, Any]
    jobs_run: int = 0
    jobs_resumed: int = 0
    timings: dict[str, dict[str, float]] = field(default_factory=dict)


def run_benchmark(
    config: RunConfig,
    out: Path,
    *,
    name: str | None = None,
    device: str = "auto",
    progress: bool = True,
    data_source: str | None = None,
    oracle=None,
    executor: ExecutorSettings | None = None,
) -> RunOutcome:
    """Run (or resume) the configured evaluation into ``out/NAME`` and return its summary.

    ``oracle`` judges invariance candidates; by default the data set's own (see ``default_oracle``).
    ``executor`` says where the jobs run (default: in this process; see ``invarbench.executors``).
    """
    run_dir = Path(out) / (name or config.default_name())
    store = RunStore(run_dir)
    executor = executor or ExecutorSettings()
    if executor.name == "ray" and device == "cuda":
        raise ConfigError(
            "--executor ray runs jobs on the workers' CPUs; use --device cpu (or auto), or the local executor for CUDA"
        )
    torch_device = resolve_device("cpu" if executor.name == "ray" else device)
    on_disk = tuple(spec for spec in config.models if spec.module is None)
    if on_disk:  # in-memory models need no loading checks
        check_models(replace(config, models=on_disk))
    check_guides(config, oracle)
    # Started (Ray joined) before the run directory is touched: an unreachable cluster leaves no files.
    with (
        create_executor(executor) as executor_run,
        RunLock(run_dir) as lock,
        discarded_on_failure(store, created=run_dir in lock.created),
    ):
        store.remove_stale_temporaries()
        check_run_dir(store, config)
        manifest = {
            "config": config.to_dict(),
            "config_sha256": config.digest(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "status": "running",
            "versions": package_versions(),
            "device": str(torch_device),
            "threads": executor_run.threads_per_worker,
            "executor": {
                "name": executor_run.name,
                "workers": executor_run.workers,
                "threads_per_worker": executor_run.threads_per_worker,
                **({"address": executor.address} if executor.address else {}),
            },
            "cpu": cpu_description(),
            "platform": platform.platform(),
            "command": " ".join(sys.argv),
        }
        if store.manifest_path.exists():
            manifest["created"] = read_json(store.manifest_path).get("created", manifest["created"])
        write_json(store.manifest_path, manifest)

        jobs = plan(config)
        outcome = RunOutcome(run_dir, {})
        judges: dict[tuple, Any] = {}
        oracle_reports: dict[str, dict[str, Any]] = {}
        model_info: dict[str, dict[str, Any]] = {}
        datasets: dict[tuple, Any] = {}
        tallies: dict[tuple, list[int]] = {}
        inputs: dict[str, ModelInputs] = {}
        tasks: list[JobTask] = []
        # Every job's records by id: read from disk for finished jobs, handed back by the executor for the others.
        records_of: dict[str, pd.DataFrame] = {}
        seconds_of: dict[str, float] = {}
        resumed_points = 0
        for spec in config.models:
            card = get_card(spec.reference) if spec.is_registered else None
            dataset_options = card.dataset_options if card else {}
            key = (spec.dataset, tuple(sorted(dataset_options.items())))
            if key not in datasets:
                datasets[key] = (
                    load_dataset(spec.dataset, source=data_source, **dataset_options)
                    if spec.dataset in ("mnist", "cifar10")
                    else load_dataset(spec.dataset, **dataset_options)
                )
            dataset = datasets[key]
            images, labels = dataset.evaluation_subset(config.n)
            model = spec.load(dataset.num_classes, dataset.bounds).to(torch_device).eval()
            check_compatible(model, dataset, source=spec.reference)
            input_size = images[0].numel()
            for threat in config.threats:
                threat.check_against_bounds(model.bounds, input_size, source=spec.key)
            flags = check_model(
                model,
                images[: min(100, config.n)],
                labels[: min(100, config.n)],
                num_classes=dataset.num_classes,
                source=spec.reference,
            )
            clean_predictions = predict(model, images)
            model_info[spec.key] = {
                "reference": spec.reference,
                "dataset": spec.dataset,
                "checkpoint_sha256": spec.checkpoint_sha256(),
                "clean_correct": int((clean_predictions == labels).sum()),
                "checks": flags,
                "warnings": [CHECKS[check] for check, raised in flags.items() if raised],
            }
            if key not in judges and any(
                attack.kind == "invariance" and getattr(ATTACKS[attack.name], "needs_oracle", False)
                for attack in config.attacks
            ):
                judges[key] = (oracle or oracles.resolve(config.oracle, dataset)).to(torch_device)
                oracle_reports[judges[key].name] = oracle_report(judges[key], images, labels)
            inputs[spec.key] = ModelInputs(
                spec,
                model,
                dataset.num_classes,
                dataset.bounds,
                model_info[spec.key]["checkpoint_sha256"],
                dataset,
                judges.get(key),
            )
            # Per norm, not per threat: an attack restricted to some eps (eps=...) still sees what the
            # attacks before it found at those eps.
            shard_jobs: dict[tuple, list[str]] = {}
            for job in (job for job in jobs if job.model == spec.key):
                earlier: tuple[str, ...] = ()
                if job.attack.kind != "invariance":
                    chain = shard_jobs.setdefault((job.threat.norm, job.shard), [])
                    earlier = tuple(chain) if config.cascade and job.attack.cascades else ()
                    chain.append(job.id)
                if store.job_done(job.id):
                    records_of[job.id], seconds_of[job.id] = store.read_job(job.id)
                    outcome.jobs_resumed += 1
                    resumed_points += job.stop - job.start
                    continue
                window = slice(job.start, job.stop)
                tasks.append(
                    JobTask(job, images[window], labels[window], clean_predictions[window], config.cascade, earlier)
                )
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

        driver_seconds = 0.0  # the driver's own time per finished job: storing it, progress (manifest: driver_seconds)

        def finished(task: JobTask, output: JobOutput) -> None:
            """Store a job's records (atomically: they mark it done) and show its progress."""
            nonlocal driver_seconds
            began = time.perf_counter()
            job = task.job
            if output.candidates is not None:
                store.write_candidates(job.id, output.candidates)
            store.write_job(job.id, output.records, seconds=output.seconds, warnings=output.warnings)
            # An attack's resume state is only needed until its job's records are on disk.
            shutil.rmtree(run_dir / "state" / job.id, ignore_errors=True)
            seconds_of[job.id] = output.seconds
            outcome.jobs_run += 1
            bar.update(job.stop - job.start)
            if job.attack.kind == "invariance":
                judged = output.records[
                    output.records["oracle_label"].notna() & (output.records["oracle_label"] != output.records["label"])
                ]
                bar.set_postfix_str(
                    f"{job.model} {job.attack.name} label changed {len(judged)}/{len(output.records)}", refresh=False
                )
            else:
                bar.set_postfix_str(
                    f"{job.model} {job.threat.norm} {job.attack.name} robust {_tally(tallies, job, output.records)}",
                    refresh=False,
                )
            driver_seconds += time.perf_counter() - began

        started = time.perf_counter()
        executor_run.run(tasks, inputs, records_of, finished, workspace=lambda job: run_dir / "state" / job.id)
        jobs_wall_seconds = time.perf_counter() - started
        bar.close()

        # Timings, warnings and records in plan order, whichever order the jobs finished in.
        all_records: list[pd.DataFrame] = []
        invariance_records: list[pd.DataFrame] = []
        attack_warnings: dict[str, dict[str, dict[str, None]]] = {spec.key: {} for spec in config.models}
        for job in jobs:
            timings = outcome.timings.setdefault(job.model, {})
            timings[job.attack.label()] = timings.get(job.attack.label(), 0.0) + seconds_of[job.id]
            # Per attack, each distinct warning its jobs raised (in order), e.g. AutoAttack's Square check.
            for warning in store.job_warnings(job.id):
                attack_warnings[job.model].setdefault(job.attack.label(), {})[f"{job.threat.norm} {warning}"] = None
            (invariance_records if job.attack.kind == "invariance" else all_records).append(records_of[job.id])
        for spec in config.models:
            outcome.timings.setdefault(spec.key, {})
            model_info[spec.key]["attack_warnings"] = {
                label: list(messages) for label, messages in attack_warnings[spec.key].items()
            }

        records = (
            as_records(pd.concat(all_records, ignore_index=True))
            if all_records
            else as_records(pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in RECORD_COLUMNS.items()}))
        )
        records = records.sort_values(["model", "norm", "eps", "attack_index", "index"], kind="stable")
        invariance = None
        if invariance_records:
            invariance = as_records(pd.concat(invariance_records, ignore_index=True)).sort_values(
                ["model", "attack_index", "norm", "eps", "index"], kind="stable"
            )
        store.write_results(records, invariance)
        outcome.summary = summarize(records, config, model_info, invariance)
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
            checkpoint_sha256={key: info["checkpoint_sha256"] for key, info in model_info.items()},
        )
        write_json(store.manifest_path, manifest)
    return outcome


__all__ = ["RunOutcome", "run_benchmark"]
