"""The results store: one run directory per configuration.

::

    RUN_DIR/
      manifest.json      config, seeds, versions, device, checkpoint sha256, timings, status
      jobs/*.parquet     per-sample records of each finished job (the unit of resumption)
      results.parquet    all perturbation records merged, written when the run completes
      invariance.parquet all invariance records merged (oracle label, model prediction, target class)
      candidates/*.npz   an invariance job's candidate images, (eps, points, ...) float32
      summary.json       clean accuracy, robust accuracy per attack and eps, worst case, counts, flags
      state/JOB/         an unfinished job's resume state (AutoAttack's state file), removed when it finishes
      run.lock           present while a process writes into the directory

Every file is written atomically (temporary file + rename), so a killed run leaves only complete
files behind and re-running the same command resumes at job granularity.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from invarbench.errors import ConfigError
from invarbench.io import atomic_write, atomic_write_text

# The columns every record starts with: model, point and the attack under its threat model.
POINT_COLUMNS = {
    "model": "string",
    "index": "int64",
    "label": "int64",
    "clean_prediction": "int64",
    "norm": "string",
    "eps": "float64",
    "attack": "string",
    "attack_index": "int64",
    "ran": "bool",
}

# Per-sample records of perturbation attacks (one row per point and eps).
RECORD_COLUMNS = {
    **POINT_COLUMNS,
    "success": "boolean",
    "adversarial_prediction": "Int64",
    "perturbation_norm": "float64",
    # The model's logit of the label minus its largest other logit at the returned example (NaN where unknown).
    "logit_margin": "float64",
}

# Per-candidate records of invariance attacks (one row per point and eps or budget).
INVARIANCE_COLUMNS = {
    **POINT_COLUMNS,
    "target_class": "Int64",
    "source_index": "Int64",
    "oracle": "string",
    "oracle_label": "Int64",
    "model_prediction": "Int64",
    "perturbation_norm": "float64",
    "logit_error": "float64",
    # The attacked model's largest logit minus its second at the candidate.
    "model_margin": "float64",
    # Votes that would have to change to change the oracle's outcome (NA for an oracle that does not vote).
    "oracle_margin": "Int64",
}

# Added after the first entries were stored: records without them read as unknown (NA).
OPTIONAL_COLUMNS = ("logit_margin", "model_margin", "oracle_margin")


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, *, fix: str = "it was not written by invarbench, remove it or choose another --out") -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} cannot be read as JSON ({error}); {fix}") from error


def read_records(path: Path, *, fix: str, columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Per-sample records stored as Parquet (``columns``: see :func:`as_records`); a damaged file is an
    error that names ``fix``."""
    try:
        return as_records(pd.read_parquet(path), columns)
    except (OSError, pa.ArrowException) as error:
        raise ConfigError(f"records {path} are damaged ({error}); {fix}") from error


class RunLock:
    """An exclusive lock on a run directory, so two runs cannot write into it at once.

    A lock left by a process that no longer exists (killed) is taken over.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / "run.lock"
        self.held = False
        self.created: list[Path] = []

    def __enter__(self) -> RunLock:
        # The folders the lock creates, innermost first: removed on exit if a failed run left them empty.
        self.created = [folder for folder in (self.path.parent, *self.path.parent.parents) if not folder.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise ConfigError(
                        f"another invarbench run (pid {owner}) is writing into {self.path.parent}; wait for it to"
                        " finish or pass another --out"
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(handle, "w") as lock_file:
                lock_file.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            return self
        raise ConfigError(
            f"could not take the lock {self.path}; remove it if no invarbench run is using {self.path.parent}"
        )

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __exit__(self, *exc_info) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            for folder in self.created:
                try:
                    folder.rmdir()
                except OSError:  # not empty: a run's results
                    break


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunStore:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.jobs_dir = self.run_dir / "jobs"
        self.manifest_path = self.run_dir / "manifest.json"
        self.summary_path = self.run_dir / "summary.json"
        self.results_path = self.run_dir / "results.parquet"
        self.invariance_path = self.run_dir / "invariance.parquet"
        self.candidates_dir = self.run_dir / "candidates"

    def remove_stale_temporaries(self) -> None:
        """Delete temporary files a killed writer left behind; call only while holding the run lock."""
        for leftover in self.run_dir.rglob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    def job_path(self, job_id: str) -> Path:
        return self.jobs_dir / f"{job_id}.parquet"

    def job_done(self, job_id: str) -> bool:
        return self.job_path(job_id).exists()

    def write_candidates(self, job_id: str, candidates) -> None:
        """Candidate images of an invariance job; written before its records, which mark it done."""

        def write(tmp: Path) -> None:
            # Through a file object: given a path, numpy would append ".npz" to the temporary name.
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, candidates=np.asarray(candidates, dtype=np.float32))

        atomic_write(self.candidates_dir / f"{job_id}.npz", write)

    def write_job(
        self,
        job_id: str,
        records: pd.DataFrame,
        *,
        seconds: float,
        warnings: tuple[str, ...] = (),
        columns: dict[str, str] | None = None,
    ) -> None:
        """A finished job's records (with its track's ``columns``), its time and the reliability warnings its
        attack raised."""
        table = pa.Table.from_pandas(as_records(records, columns), preserve_index=False)
        metadata = {
            b"invarbench.seconds": str(seconds).encode(),
            b"invarbench.warnings": json.dumps(list(warnings)).encode(),
        }
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        atomic_write(self.job_path(job_id), lambda tmp: pq.write_table(table, tmp))

    def read_job(self, job_id: str, columns: dict[str, str] | None = None) -> tuple[pd.DataFrame, float]:
        """A finished job's records (with its track's ``columns``) and its time."""
        table = pq.read_table(self.job_path(job_id))
        seconds = float((table.schema.metadata or {}).get(b"invarbench.seconds", b"0"))
        return as_records(table.to_pandas(), columns), seconds

    def job_warnings(self, job_id: str) -> list[str]:
        """The reliability warnings a finished job's attack raised (none for jobs stored before they were kept)."""
        metadata = pq.read_schema(self.job_path(job_id)).metadata or {}
        return json.loads(metadata.get(b"invarbench.warnings", b"[]"))

    def write_records(self, name: str, records: pd.DataFrame) -> None:
        """Every record of a track (``results.parquet``, ``invariance.parquet``), once the run is complete."""
        atomic_write(self.run_dir / name, lambda tmp: records.reset_index(drop=True).to_parquet(tmp, index=False))


def as_records(frame: pd.DataFrame, columns: dict[str, str] | None = None) -> pd.DataFrame:
    """``frame`` with exactly the record ``columns`` (a track's), in order, with their declared dtypes;
    without ``columns``, those of the perturbation or invariance records (told apart by ``oracle``)."""
    if columns is None:
        columns = INVARIANCE_COLUMNS if "oracle" in frame else RECORD_COLUMNS
    absent = [column for column in OPTIONAL_COLUMNS if column in columns and column not in frame]
    if absent:
        frame = frame.assign(**{column: pd.Series(index=frame.index, dtype=columns[column]) for column in absent})
    missing = [column for column in columns if column not in frame]
    if missing:
        raise ConfigError(
            f"per-sample records lack the columns {missing}; the file was not written by this version of invarbench"
        )
    return frame[list(columns)].astype(columns).reset_index(drop=True)
