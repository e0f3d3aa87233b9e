"""The Ray executor: a run whose jobs are Ray tasks writes the per-sample records of the local executor,
also when a worker is SIGKILLed in the middle of a job (retried) or the driver is (re-run: resumed).

One Ray session serves the module (its start costs seconds); runs in this interpreter join it, the
killed driver joins it by --address. The session is shut down at the end and no Ray process may be
left behind. Local runs compared with Ray runs use one torch thread, as the workers do: on some CPUs
a batch's logits differ in the last bits between thread counts. The tests that use it are marked slow
(`make test-fast` skips them, `make test` runs them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import torch

# The kill-resume test's run: PGD, FGSM in the cascade and an invariance attack, 3 x 6 shards = 18 jobs.
from test_kill_resume import JOBS, RUN
from torch import nn

from invarbench.attacks import ThreatModel
from invarbench.cli import main
from invarbench.config import AttackSpec, ModelSpec, RunConfig, entry_config
from invarbench.errors import ConfigError
from invarbench.executors import ExecutorSettings
from invarbench.leaderboard.entries import add_run
from invarbench.models import load_model
from invarbench.runner import run_benchmark

RAY = ["--executor", "ray", "--workers", "2", "--threads-per-worker", "1"]


def _ray_processes() -> set[int]:
    """Pids of Ray's processes on this machine (GCS, raylet, agents, workers)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if (
                command.startswith("ray::")
                or "/ray/core/src/ray/" in command
                or "ray/_private/workers/default_worker.py" in command
            ):
                found.add(int(entry.name))
    return found


@pytest.fixture(scope="module")
def cluster():
    """A local Ray session with 2 CPUs for the module; yields its address. No Ray process outlives it."""
    before = _ray_processes()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # The test's model classes travel to the workers by value (the workers cannot import this file).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 60
        while _ray_processes() - before and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _ray_processes() - before
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"Ray processes {sorted(left)} outlived ray.shutdown()"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cluster):
    """The run with the local executor (started after the cluster, which it must ignore)."""
    out = tmp_path_factory.mktemp("local")
    assert main([*RUN, "--out", str(out)]) == 0
    return out / "run"


def _job_table(path: Path):
    # Without the schema metadata, which holds the job's time.
    return pq.read_table(path).replace_schema_metadata(None)


def _assert_same_results(run_dir: Path, reference: Path) -> None:
    assert sorted(path.name for path in (run_dir / "jobs").iterdir()) == sorted(
        path.name for path in (reference / "jobs").iterdir()
    )
    for job in (reference / "jobs").iterdir():
        assert _job_table(run_dir / "jobs" / job.name).equals(_job_table(job)), job.name
        assert (
            pq.read_schema(run_dir / "jobs" / job.name).metadata[b"invarbench.warnings"]
            == pq.read_schema(job).metadata[b"invarbench.warnings"]
        )
    for name in ("results.parquet", "invariance.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(run_dir / name), pd.read_parquet(reference / name), check_exact=True
        )
    for candidates in (reference / "candidates").iterdir():
        with np.load(candidates) as expected, np.load(run_dir / "candidates" / candidates.name) as found:
            np.testing.assert_array_equal(found["candidates"], expected["candidates"])
    summary, expected = (json.loads((path / "summary.json").read_text()) for path in (run_dir, reference))
    assert {key: value for key, value in summary.items() if key not in ("executor", "workers")} == {
        key: value for key, value in expected.items() if key not in ("executor", "workers")
    }
    assert not (run_dir / "run.lock").exists() and not (run_dir / "state").exists() and not list(run_dir.rglob("*.tmp"))


def test_executor_options_are_checked_before_anything_is_written(tmp_path, capsys, monkeypatch):
    assert main([*RUN, "--out", str(tmp_path), "--workers", "2"]) == 1
    assert "--workers applies to --executor ray only" in capsys.readouterr().err
    assert main([*RUN, "--out", str(tmp_path), *RAY[:2], "--workers", "0"]) == 1
    assert "--workers 0 must be at least 1" in capsys.readouterr().err
    assert main([*RUN, "--out", str(tmp_path), *RAY[:2], "--device", "cuda"]) == 1
    assert "--executor ray runs jobs on the workers' CPUs" in capsys.readouterr().err
    # Nothing answers on port 1: refused at once, naming the address and how to start a head.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert main([*RUN, "--out", str(tmp_path), *RAY[:2], "--address", "127.0.0.1:1"]) == 1
    error = capsys.readouterr().err
    assert "--address 127.0.0.1:1: no Ray head answers there" in error and "ray start --head" in error
    monkeypatch.setitem(sys.modules, "ray", None)  # ray not installed
    with pytest.raises(ConfigError, match=r"--executor ray needs the ray package.*pip install"):
        run_benchmark(
            RunConfig(
                (ModelSpec("spheres-mlp-standard", "spheres"),),
                (ThreatModel("linf", (0.02,)),),
                (AttackSpec("fgsm"),),
                n=10,
            ),
            tmp_path,
            executor=ExecutorSettings("ray"),
        )
    assert not list(tmp_path.iterdir()), "a refused run wrote files"


@pytest.mark.slow
def test_ray_run_has_the_local_runs_records_and_records_its_executor(tmp_path, cluster, reference):
    assert main([*RUN, "--out", str(tmp_path), *RAY]) == 0
    run_dir = tmp_path / "run"
    _assert_same_results(run_dir, reference)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["executor"] == {"name": "ray", "workers": 2, "threads_per_worker": 1} and manifest["threads"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["executor"], summary["workers"]) == ("ray", 2)
    local = json.loads((reference / "summary.json").read_text())
    assert (local["executor"], local["workers"]) == ("local", 1)
    # The entries keep the executor; an entry of the same run made locally does not conflict with it.
    entries = tmp_path / "entries"
    add_run(reference, entries, galleries=False)
    [path] = add_run(run_dir, entries, galleries=False, tracks=("perturbation",))
    entry = json.loads(path.read_text())
    assert (entry["settings"]["executor"], entry["settings"]["workers"]) == ("ray", 2)
    # `invarbench check` rebuilds the configuration from entries with and without them (older ones).
    for settings in (
        entry["settings"],
        {key: value for key, value in entry["settings"].items() if key not in ("executor", "workers")},
    ):
        config = entry_config({**entry, "settings": settings}, 20)
        assert config.n == 20 and [attack.name for attack in config.attacks][-1] == "fgsm"


class KillsItsWorkerOnce(nn.Module):
    """A network whose third forward pass in a process other than the driver SIGKILLs that process,
    once per marker file: a Ray worker dying in the middle of an attack."""

    def __init__(self, network: nn.Module, marker: Path):
        super().__init__()
        self.network = network
        self.marker = str(marker)
        self.driver = os.getpid()
        self.calls = (os.getpid(), 0)

    def forward(self, inputs):
        # Counted per process: the copy a worker receives was already called by the driver's checks.
        pid, calls = self.calls
        self.calls = (os.getpid(), calls + 1 if pid == os.getpid() else 1)
        if os.getpid() != self.driver and self.calls[1] == 3:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                Path(self.marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        return self.network(inputs)


@pytest.mark.slow
def test_a_worker_killed_in_the_middle_of_a_job_is_retried_and_changes_nothing(tmp_path, cluster):
    marker = tmp_path / "killed"
    model = load_model("spheres-mlp-standard")
    model.network = KillsItsWorkerOnce(model.network, marker)
    spec = ModelSpec.from_module(model, "spheres", name="spheres-killer")
    config = RunConfig(
        (spec,),
        (ThreatModel("linf", (0.02, 0.05)),),
        (AttackSpec("pgd", (("steps", 5),)), AttackSpec("fgsm")),
        n=40,
        shard_size=10,
    )
    local = run_benchmark(
        config, tmp_path, name="local", progress=False, executor=ExecutorSettings("local", threads_per_worker=1)
    )
    assert not marker.exists(), "the driver's forward passes must not kill it"
    distributed = run_benchmark(
        config, tmp_path, name="ray", progress=False, executor=ExecutorSettings("ray", workers=2, threads_per_worker=1)
    )
    assert marker.exists() and int(marker.read_text()) != os.getpid(), "no worker was killed"
    assert distributed.jobs_run == local.jobs_run == 8
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "ray" / "results.parquet"),
        pd.read_parquet(tmp_path / "local" / "results.parquet"),
        check_exact=True,
    )
    for job in (tmp_path / "local" / "jobs").iterdir():
        assert _job_table(tmp_path / "ray" / "jobs" / job.name).equals(_job_table(job)), job.name


@pytest.mark.slow
def test_a_killed_driver_resumes_with_the_same_records(tmp_path, cluster, reference):
    command = [*RUN, "--out", str(tmp_path), *RAY, "--address", cluster]
    driver = subprocess.Popen(
        [sys.executable, "-m", "invarbench.cli", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    jobs = tmp_path / "run" / "jobs"
    deadline = time.monotonic() + 120
    while (
        driver.poll() is None
        and time.monotonic() < deadline
        and len(list(jobs.glob("*.parquet")) if jobs.exists() else []) < 4
    ):
        time.sleep(0.02)
    assert driver.poll() is None, f"the driver ended before it was killed: {driver.stderr.read().decode()[-2000:]}"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    driver.stderr.close()
    done = len(list(jobs.glob("*.parquet")))
    assert 4 <= done < JOBS and (tmp_path / "run" / "run.lock").exists()
    # The same command again, in this interpreter (so in the module's Ray session, as the killed driver was).
    assert main(command) == 0
    _assert_same_results(tmp_path / "run", reference)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_a_checkpoint_file_reaches_the_workers_through_the_object_store(tmp_path, cluster):
    """A TorchScript checkpoint: the workers get its bytes through the object store (checked by sha256,
    loaded from a temporary copy; they never open the driver's path) and compute the local records."""
    network = load_model("spheres-mlp-standard").network
    path = tmp_path / "spheres.pt"
    torch.jit.save(torch.jit.script(network), str(path))
    command = [
        "run",
        str(path),
        "--dataset",
        "spheres",
        "--attack",
        "fgsm",
        "--threat",
        "linf:0.05",
        "--n",
        "20",
        "--shard-size",
        "10",
        "--no-progress",
    ]
    assert main([*command, "--out", str(tmp_path / "local"), "--name", "run", "--threads-per-worker", "1"]) == 0
    assert main([*command, "--out", str(tmp_path / "ray"), "--name", "run", *RAY]) == 0
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "ray" / "run" / "results.parquet"),
        pd.read_parquet(tmp_path / "local" / "run" / "results.parquet"),
        check_exact=True,
    )


@pytest.mark.slow
def test_evaluate_takes_the_executor_options(tmp_path, cluster):
    import invarbench

    options = dict(dataset="spheres", threats="linf:0.05", attacks=["fgsm"], n=20, out=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="--workers applies to --executor ray only"):
        invarbench.evaluate("spheres-mlp-standard", workers=2, **options)
    local = invarbench.evaluate("spheres-mlp-standard", name="local", **options)
    distributed = invarbench.evaluate("spheres-mlp-standard", name="ray", executor="ray", workers=2, **options)
    pd.testing.assert_frame_equal(distributed.records, local.records, check_exact=True)
    assert (distributed.summary_dict["executor"], distributed.summary_dict["workers"]) == ("ray", 2)
