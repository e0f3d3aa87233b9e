"""Executors: where a run's jobs execute. ``local`` runs them in this process, one after another in
plan order; ``ray`` runs them as Ray tasks on the workers of a local or remote Ray cluster.

A job's execution is a pure function (:func:`perform`) of the job, the model, the shard's points, the
records of the earlier attacks of its shard (the cascade) and, for invariance attacks, the data set and
the oracle. An executor only decides where and when ``perform`` runs: the driver (the runner) alone
writes the run directory, keeps the progress bar and builds the summary, from the :class:`JobOutput`
each finished job hands back. A job starts only once the records of the jobs it reads (``after``) are
known, so the cascade's order within a shard holds on every executor; independent shards and models
run side by side on Ray.

On Ray, a worker needs only the installed package: a registered model is loaded by name from the
worker's own installation (its checkpoint's sha256 checked against the driver's), a checkpoint file is
sent through the object store as bytes (checked by sha256 before loading), an in-memory or RobustBench
model as the module the driver loaded. A task whose worker process dies (killed, out of memory) is
retried up to ``max_retries`` times; its job is pure, so the retry's records are the ones an
uninterrupted run would have written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from invarbench.config import ModelSpec
from invarbench.errors import ConfigError, InvarbenchError
from invarbench.jobs import Job, JobOutput, JobTask
from invarbench.tracks import track_of

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorSettings:
    """How a run executes its jobs: ``local`` (in this process) or ``ray`` (as Ray tasks).

    ``address`` joins a running Ray cluster (``ray start --head`` prints it; ``auto`` finds one on this
    machine); without it Ray starts on this machine with ``workers`` x ``threads_per_worker`` CPUs.
    ``workers`` is how many jobs run at once (default: this machine's cores, or the cluster's CPUs
    divided by ``threads_per_worker``); ``threads_per_worker`` the torch threads of each job (default
    1 on Ray; for ``local``, torch's own default unless given). ``max_retries``: how often a job whose
    worker process died is started again.
    """

    name: str = "local"
    address: str | None = None
    workers: int | None = None
    threads_per_worker: int | None = None
    max_retries: int = 3

    def __post_init__(self):
        if self.name not in EXECUTORS:
            raise ConfigError(f"unknown executor {self.name!r}; use {' or '.join(EXECUTORS)}")
        if self.name == "local" and (self.address is not None or self.workers is not None):
            option = "--address" if self.address is not None else "--workers"
            raise ConfigError(
                f"{option} applies to --executor ray only; add --executor ray (executor='ray') or drop {option}"
            )
        for option, value in (("--workers", self.workers), ("--threads-per-worker", self.threads_per_worker)):
            if value is not None and value < 1:
                raise ConfigError(f"{option} {value} must be at least 1")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries {self.max_retries} must be 0 or more")


@dataclass
class ModelInputs:
    """What the jobs of one model share: the model as the driver loaded it, where a worker gets it from,
    and (for invariance attacks) the data set and the oracle."""

    spec: ModelSpec
    model: torch.nn.Module
    num_classes: int
    bounds: tuple[float, float]
    sha256: str
    dataset: Any = None
    oracle: Any = None


def perform(
    task: JobTask,
    model: torch.nn.Module,
    earlier: list[pd.DataFrame],
    *,
    dataset: Any = None,
    oracle: Any = None,
    workspace: Path | None = None,
) -> JobOutput:
    """Run one job through its attack's track: a pure function of the job, the model, its shard, the
    earlier attacks' records and, for tracks whose jobs need them, the data set and oracle."""
    started = time.perf_counter()
    output = track_of(task.job.attack).execute(
        task, model, earlier, dataset=dataset, oracle=oracle, workspace=workspace
    )
    return replace(output, seconds=time.perf_counter() - started)


class LocalExecutor:
    """Every job in this process, in plan order (what `invarbench run` always did)."""

    name = "local"

    def __init__(self, settings: ExecutorSettings):
        self.settings = settings
        self._threads: int | None = None

    @property
    def workers(self) -> int:
        return 1

    @property
    def threads_per_worker(self) -> int:
        return torch.get_num_threads()

    def __enter__(self) -> LocalExecutor:
        if self.settings.threads_per_worker is not None:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(self.settings.threads_per_worker)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)

    def run(
        self,
        tasks: list[JobTask],
        inputs: dict[str, ModelInputs],
        known: dict[str, pd.DataFrame],
        *,
        workspace: Callable[[Job], Path],
    ) -> Iterator[tuple[JobTask, JobOutput]]:
        """Run ``tasks`` in order and yield each with its output; ``known`` holds the records of finished
        jobs that tasks read (the cascade), and the executor adds each output's records to it."""
        records = known
        for task in tasks:
            shared = inputs[task.job.model]
            output = perform(
                task,
                shared.model,
                [records[job_id] for job_id in task.after],
                dataset=shared.dataset,
                oracle=shared.oracle,
                workspace=workspace(task.job),
            )
            records[task.job.id] = output.records
            yield task, output


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise ConfigError(
            f"--executor ray needs the ray package, which cannot be imported here ({error}); install it with `pip"
            " install 'ray==2.60.*'` (`make install` does) or use --executor local"
        ) from error
    return ray


def _check_reachable(address: str) -> None:
    """A HOST:PORT address answers, so that a typo fails at once with the fix instead of after Ray's
    own long reconnection timeout."""
    host, separator, port = address.rpartition(":")
    if not separator or "://" in address or not port.isdigit():
        return  # "auto", "ray://..." and other forms Ray understands: Ray reports on them itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise ConfigError(
            f"--address {address}: no Ray head answers there ({error}); start one with `ray start --head` on that"
            " machine and pass the address it prints, or drop --address to start Ray on this machine"
        ) from error


class RayExecutor:
    """Jobs as Ray tasks; the driver submits a job once the records it reads are known and keeps at
    most ``workers`` jobs running."""

    name = "ray"

    def __init__(self, settings: ExecutorSettings):
        self.settings = settings
        self.ray = _import_ray()
        self.started = False
        self.workers = settings.workers or 0
        self.threads_per_worker = settings.threads_per_worker or 1

    def __enter__(self) -> RayExecutor:
        ray = self.ray
        settings = self.settings
        if not ray.is_initialized():
            if settings.address is not None:
                _check_reachable(settings.address)
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if settings.address is None:
                options["num_cpus"] = (settings.workers or os.cpu_count() or 1) * self.threads_per_worker
            try:
                ray.init(address=settings.address, **options)
            except (ConnectionError, RuntimeError, ValueError) as error:
                where = (
                    f"the Ray cluster at --address {settings.address}" if settings.address else "a local Ray instance"
                )
                raise ConfigError(
                    f"could not start or join {where} ({error}); check `ray status` on the head machine, or drop"
                    " --address to start Ray here"
                ) from error
            self.started = True
        if not self.workers:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            self.workers = max(1, cpus // self.threads_per_worker)
        # Worker processes start and import torch and invarbench (seconds) while the driver loads and
        # checks the models, instead of after the first jobs are submitted.
        warm_up = ray.remote(_warm_up).options(num_cpus=self.threads_per_worker)
        for _ in range(self.workers):
            warm_up.remote()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False

    def run(
        self,
        tasks: list[JobTask],
        inputs: dict[str, ModelInputs],
        known: dict[str, pd.DataFrame],
        *,
        workspace: Callable[[Job], Path],
    ) -> Iterator[tuple[JobTask, JobOutput]]:
        """Submit each task once the records it reads are known, at most ``workers`` at once, and yield
        each finished task with its output (in the order they finish)."""
        records = known
        ray = self.ray
        remote = ray.remote(_ray_job).options(
            num_cpus=self.threads_per_worker, max_retries=self.settings.max_retries, retry_exceptions=False
        )
        shared = {}
        for key in {task.job.model for task in tasks}:
            source = inputs[key]
            needs_data = any(track_of(task.job.attack).needs_dataset for task in tasks if task.job.model == key)
            payload = _model_payload(source)
            shared[key] = (
                _WorkerModel(
                    source.spec,
                    source.num_classes,
                    source.bounds,
                    source.sha256,
                    payload[0],
                    ray.put(payload[1]) if payload[1] is not None else None,
                ),
                ray.put(source.dataset) if needs_data else None,
                ray.put(source.oracle) if needs_data and source.oracle is not None else None,
            )
        pending = list(tasks)
        running: dict[Any, JobTask] = {}
        try:
            while pending or running:
                for task in list(pending):
                    if len(running) >= self.workers:
                        break
                    if all(job_id in records for job_id in task.after):
                        model, dataset, oracle = shared[task.job.model]
                        # Object references in a list reach the task unresolved: it fetches each once per worker.
                        running[
                            remote.remote(
                                task,
                                model,
                                [dataset, oracle],
                                self.threads_per_worker,
                                [records[job_id] for job_id in task.after],
                            )
                        ] = task
                        pending.remove(task)
                if not running:
                    missing = sorted({job_id for task in pending for job_id in task.after if job_id not in records})
                    raise InvarbenchError(f"jobs wait for records no job produces: {missing[:3]}")
                ready, _ = ray.wait(list(running), num_returns=1)
                for reference in ready:
                    task = running.pop(reference)
                    output = self._result(reference, task)
                    records[task.job.id] = output.records
                    yield task, output
        finally:
            for reference in running:
                ray.cancel(reference, force=True)

    def _result(self, reference, task: JobTask) -> JobOutput:
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(reference)
        except exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, InvarbenchError):
                raise type(cause)(f"job {task.job.id} on a Ray worker: {cause}") from error
            raise
        except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.OutOfMemoryError) as error:
            raise InvarbenchError(
                f"job {task.job.id}: its Ray worker died {self.settings.max_retries + 1} times"
                f" ({type(error).__name__}); the finished jobs are stored: re-run the same command to resume"
            ) from error


@dataclass(frozen=True)
class _WorkerModel:
    """How a worker gets a model: ``by_name`` (registered, loaded from the worker's installation),
    ``file`` (a checkpoint's bytes) or ``module`` (the driver's loaded module), with the driver's sha256."""

    spec: ModelSpec
    num_classes: int
    bounds: tuple[float, float]
    sha256: str
    source: str
    payload: Any = None


def _model_payload(source: ModelInputs) -> tuple[str, Any]:
    spec = source.spec
    if spec.module is None and spec.is_registered:
        return "by_name", None
    if spec.module is None and Path(spec.reference).is_file():
        return "file", Path(spec.reference).read_bytes()
    return "module", source.model


# A worker's models, data sets and oracles by their driver-side identity, so that the jobs a worker runs
# load each once; emptied when it holds more than _WORKER_CACHE_SIZE (a long-lived driver's many runs).
_WORKER_CACHE: dict[Any, Any] = {}
_WORKER_CACHE_SIZE = 16


def _cached(key: Any, load: Callable[[], Any]) -> Any:
    if key not in _WORKER_CACHE:
        if len(_WORKER_CACHE) >= _WORKER_CACHE_SIZE:
            _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = load()
    return _WORKER_CACHE[key]


def _worker_model(model: _WorkerModel) -> torch.nn.Module:
    return _cached(
        ("model", model.spec.key, model.sha256),
        lambda: _load_worker_model(model, _fetched(model.payload, keep=False)).eval(),
    )


def _load_worker_model(model: _WorkerModel, payload: Any) -> torch.nn.Module:
    host = socket.gethostname()
    if model.source == "by_name":
        loaded = model.spec.load(model.num_classes, model.bounds)
        found = model.spec.checkpoint_sha256()
        if found != model.sha256:
            raise ConfigError(
                f"model {model.spec.key} on Ray worker {host} has checkpoint sha256 {found[:12]}, the driver's has"
                f" {model.sha256[:12]}; install the same invarbench version on every node"
            )
    elif model.source == "file":
        data = payload
        found = hashlib.sha256(data).hexdigest()
        if found != model.sha256:
            raise ConfigError(
                f"checkpoint {model.spec.reference} reached Ray worker {host} with sha256 {found[:12]}, the driver's is"
                f" {model.sha256[:12]}; re-run the same command"
            )
        folder = Path(tempfile.mkdtemp(prefix="invarbench-model-"))
        try:
            path = folder / Path(model.spec.reference).name
            path.write_bytes(data)
            loaded = ModelSpec(
                str(path), model.spec.dataset, model.spec.architecture, model.spec.architecture_args
            ).load(model.num_classes, model.bounds)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        loaded = payload
    return loaded


def _fetched(reference, *, keep: bool = True) -> Any:
    """An object of the object store, fetched once per worker (``keep``) or each time asked for."""
    if reference is None:
        return None
    import ray

    return _cached(("object", reference.hex()), lambda: ray.get(reference)) if keep else ray.get(reference)


def _warm_up() -> int:
    """A task that only brings a worker process up with this module (torch, pandas, invarbench) imported."""
    return os.getpid()


def _ray_job(task: JobTask, model: _WorkerModel, shared: list, threads: int, earlier: list[pd.DataFrame]) -> JobOutput:
    """A job as a Ray task, in a worker process."""
    torch.set_num_threads(threads)
    network = _worker_model(model)
    dataset, oracle = (_fetched(reference) for reference in shared)
    # An attack's resume state (AutoAttack's) lives on the worker's disk until the job returns.
    workspace = Path(tempfile.gettempdir()) / "invarbench-state" / f"{os.getpid()}-{task.job.id}"
    try:
        return perform(task, network, earlier, dataset=dataset, oracle=oracle, workspace=workspace)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def create_executor(settings: ExecutorSettings | None):
    settings = settings or ExecutorSettings()
    return RayExecutor(settings) if settings.name == "ray" else LocalExecutor(settings)
