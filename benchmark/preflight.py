"""Checks of a run's inputs before anything is written, so that a bad input leaves every file as it was.

``check_models`` and ``check_guides`` run before the run directory is created or locked,
``check_run_dir`` under the run lock before the manifest is rewritten; ``discarded_on_failure``
removes a run directory this run created when the run fails (e.g. on a checkpoint that does not
load) before its first job is stored.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from invarbench.attacks.invariance import load_guide
from invarbench.config import RunConfig
from invarbench.errors import ConfigError, InvarbenchError
from invarbench.models import BenchmarkModel, get_card, load_model
from invarbench.models.external import check_robustbench, is_robustbench
from invarbench.oracles.types import DEFAULT_ORACLES, Oracle, oracle_members
from invarbench.store import RunStore, read_json


def check_models(config: RunConfig) -> dict[str, BenchmarkModel]:
    """Every model is a registered one whose card and checkpoint load (sha256 checked), or an existing
    checkpoint file; every eps fits a registered model's input bounds. Returns the registered models as
    loaded, by key, for the run to evaluate (in-memory models need no checks)."""
    loaded = {}
    for spec in config.models:
        if spec.module is not None:
            continue
        if is_robustbench(spec.reference):
            check_robustbench(spec.reference)
        elif not spec.is_registered and not Path(spec.reference).exists():
            get_card(spec.reference)  # raises the registry's "unknown model" error, with suggestions
        if spec.is_registered:
            card = get_card(spec.reference)
            loaded[spec.key] = load_model(spec.reference)
            for threat in config.threats:
                threat.check_against_bounds(card.bounds, math.prod(card.input_shape), source=spec.key)
    return loaded


def check_guides(config: RunConfig, oracle: Oracle | None = None) -> None:
    """Every guide of a search that chooses by one loads and is not the oracle that will judge the run
    (``oracle``, else the configured one, else each data set's default) nor one of its members."""
    for attack in config.attacks:
        guide = attack.provenance().get("guide")
        if guide is None:
            continue
        for dataset in sorted({spec.dataset for spec in config.models}):
            judge = oracle.name if oracle is not None else config.oracle or DEFAULT_ORACLES.get(dataset)
            if judge is not None:
                load_guide(
                    attack.name,
                    guide,
                    judge=judge,
                    judge_members=(
                        getattr(oracle, "member_checkpoints", {}) if oracle is not None else oracle_members(judge)
                    ),
                )


def check_run_dir(store: RunStore, config: RunConfig) -> None:
    """An existing run directory holds a run of this configuration, and its finished jobs can be read."""
    if store.manifest_path.exists():
        previous = read_json(store.manifest_path)
        if not isinstance(previous, dict) or not isinstance(previous.get("config"), dict):
            raise ConfigError(
                f"{store.manifest_path} is not a manifest of `invarbench run` (no config object); remove"
                f" {store.run_dir} or pass another --out/--name"
            )
        if previous["config"] != config.to_dict():
            raise ConfigError(
                f"{store.run_dir} holds a run with a different configuration; re-run with the options recorded in"
                f" {store.manifest_path} to resume it, or pass another --out/--name"
            )
    for path in sorted(store.jobs_dir.glob("*.parquet")):
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowException) as error:
            raise ConfigError(
                f"job records {path} are damaged ({error}); delete that file and re-run the same command: only its job"
                " runs again"
            ) from error


@contextmanager
def discarded_on_failure(store: RunStore, *, created: bool) -> Iterator[None]:
    """Under the run lock: when the run fails with an input error before storing a job, remove what it
    wrote into the directory, if it ``created`` that directory (the lock removes the emptied folder)."""
    try:
        yield
    except InvarbenchError:
        if created and not any(store.jobs_dir.glob("*.parquet")):
            for path in store.run_dir.iterdir():
                if path.name != "run.lock":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise
