"""Kill-resume: a small run SIGKILLed at 10 random moments and then re-run with the same command always
ends with the results of an uninterrupted run, and leaves no temporary file, lock or resume state.

Each killed run is a fresh interpreter (a child forked from this one can hang in torch's thread pool
once earlier tests have used it) that imports what a run needs, says it is ready and waits for a go:
the kill moments are drawn between 0 and the length of an uninterrupted run counted from the go, so
they land in model loading, jobs and writes rather than in imports. The next cycle's interpreter is
started (and imports) while the current cycle runs, so the imports cost no wall time. The reference run
and the resumes run in this interpreter.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from invarbench.cli import main

RUN = [
    "run", "spheres-mlp-standard",
    "--attack", "pgd:steps=5", "--attack", "fgsm", "--attack", "invariance-linf",
    "--threat", "linf:0.02,0.05", "--n", "40", "--shard-size", "10",
    "--name", "run", "--no-progress",
    # One torch thread in every run: on some CPUs (AMD EPYC here) a batch's logits differ in the last bits
    # between 1 and 2 threads, and the killed interpreters run with one.
    "--threads-per-worker", "1",
]  # fmt: skip
JOBS = 12  # 3 attacks x 4 shards of 10 points
KILLS = 10


# Imports everything a run needs, says it is ready, and runs once told to go (a line on stdin; if the
# test stops first, stdin closes and the interpreter exits without running).
CHILD = (
    "import sys; from pathlib import Path; import invarbench.runner, invarbench.api; from invarbench.cli import main;"
    " Path(sys.argv[1]).touch(); sys.stdin.readline().strip() == 'go' or sys.exit(3); sys.exit(main(sys.argv[2:]))"
)


def _spawn(out: Path) -> subprocess.Popen:
    """Start an interpreter for the run into ``out``; it imports, then waits for :func:`_go`."""
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out.parent / f"{out.name}.ready"), *RUN, "--out", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _go(process: subprocess.Popen, out: Path) -> None:
    """Wait until the interpreter for ``out`` has imported the CLI, then let its run start."""
    ready = out.parent / f"{out.name}.ready"
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, (
            f"the run into {out} did not start (exit {process.returncode})"
        )
        time.sleep(0.01)
    process.stdin.write(b"go\n")
    process.stdin.close()


def _finish(out: Path) -> float:
    """Run (or resume) into ``out`` to the end, in this interpreter; return how long it took."""
    started = time.perf_counter()
    assert main([*RUN, "--out", str(out)]) == 0, f"the run into {out} failed"
    return time.perf_counter() - started


def _files(run_dir: Path) -> list[str]:
    return sorted(path.relative_to(run_dir).as_posix() for path in run_dir.rglob("*") if path.is_file())


def _job_records(path: Path) -> pd.DataFrame:
    # The table without its schema metadata, which holds the job's time (invarbench.seconds).
    return pq.read_table(path).to_pandas()


def _assert_same_results(run_dir: Path, reference: Path) -> None:
    assert _files(run_dir) == _files(reference), (
        "other files than an uninterrupted run's (a leftover temporary, lock or state?)"
    )
    for name in ("results.parquet", "invariance.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(run_dir / name), pd.read_parquet(reference / name), check_exact=True
        )
    for job in sorted((reference / "jobs").iterdir()):
        pd.testing.assert_frame_equal(_job_records(run_dir / "jobs" / job.name), _job_records(job), check_exact=True)
    for candidates in sorted((reference / "candidates").iterdir()):
        with np.load(candidates) as expected, np.load(run_dir / "candidates" / candidates.name) as found:
            np.testing.assert_array_equal(found["candidates"], expected["candidates"])
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
    manifest, expected = (json.loads((path / "manifest.json").read_text()) for path in (run_dir, reference))
    assert manifest["status"] == "complete"
    for key in ("config", "config_sha256", "checkpoint_sha256"):
        assert manifest[key] == expected[key]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_results(tmp_path, monkeypatch):
    monkeypatch.setenv("INVARBENCH_HOME", str(tmp_path / "home"))
    duration = _finish(tmp_path / "reference")
    reference = tmp_path / "reference" / "run"
    assert len(list((reference / "jobs").glob("*.parquet"))) == JOBS
    draw = random.Random(20)
    interrupted = []
    upcoming = _spawn(tmp_path / "cycle0")
    for cycle in range(KILLS):
        out, process = tmp_path / f"cycle{cycle}", upcoming
        _go(process, out)
        if cycle + 1 < KILLS:
            upcoming = _spawn(tmp_path / f"cycle{cycle + 1}")
        time.sleep(draw.uniform(0, duration))
        os.kill(process.pid, signal.SIGKILL)
        # Reaped before the resume: a zombie's pid still counts as a live owner of run.lock.
        process.wait(timeout=30)
        run_dir = out / "run"
        finished = (run_dir / "jobs").glob("*.parquet") if run_dir.exists() else []
        complete = (
            run_dir.exists()
            and (run_dir / "manifest.json").exists()
            and json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
        )
        interrupted.append((process.returncode == -signal.SIGKILL and not complete, len(list(finished))))
        _finish(out)
        _assert_same_results(run_dir, reference)
        for leftover in ("run.lock", "state"):
            assert not (run_dir / leftover).exists()
        assert not list(run_dir.rglob("*.tmp"))
    # The kills landed during runs, at several stages (before the first job and between jobs), not after them.
    killed = [jobs for was_killed, jobs in interrupted if was_killed]
    assert len(killed) >= KILLS // 2, interrupted
    assert min(killed) < JOBS // 2 and max(killed) > 0, interrupted


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
