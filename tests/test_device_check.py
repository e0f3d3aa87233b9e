"""The GPU machine's script rehearsed on this CPU (issue 25): `benchmarks/device_check.sh --dry-run` checks
that what travels stays under 64 MiB and runs every part on a few points, so that device minutes are spent
measuring, not debugging. It downloads nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402  (benchmarks/report.py)


@pytest.mark.usefixtures("mnist")
def test_device_check_dry_run_writes_every_part_and_the_report_renders_it(tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "travels: tree" in completed.stdout
    written = {path.name: json.loads(path.read_text()) for path in out.glob("*.json")}
    assert set(written) == {
        "device_tests-dry-run.json",
        "pgd_sweep-dry-run.json",
        "aa_fast-dry-run.json",
        "invariance_speed-dry-run.json",
    }
    assert all(part["status"] == "ok" for part in written.values())
    collected = [test["test"] for test in written["device_tests-dry-run.json"]["tests"]]
    assert len(collected) >= 6 and all("test_cuda.py" in test for test in collected)
    # The report renders the files as it will render the GPU's (STEM-gpu.json: tables of their own).
    results = tmp_path / "results"
    results.mkdir()
    for name, data in written.items():
        (results / name.replace("dry-run", "gpu")).write_text(json.dumps(data))
    tables = report.render(results)
    assert "mnist-cnn-standard" in tables["speed-pgd-sweep-gpu"] and "mnist-cnn-standard" in tables["speed-aa-fast-gpu"]
    assert "invariance-linf" in tables["speed-invariance"] and "collected" in tables["device-tests"]
    assert tables["speed-pgd-sweep"].startswith("Not measured yet")


def test_device_check_refuses_to_run_without_the_carried_files(tmp_path):
    """A checkout without .device (make device-wheels not run) stops before installing anything."""
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "device_check.sh"
    script.write_text((ROOT / "benchmarks" / "device_check.sh").read_text())
    completed = subprocess.run(["bash", str(script), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert completed.returncode == 2 and "run `make device-wheels` here" in completed.stderr
    completed = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert completed.returncode == 2 and "unknown argument --bogus" in completed.stderr


def test_every_cuda_test_lives_where_the_device_check_runs_them():
    """The device check collects only tests/test_cuda.py (other modules import packages that do not travel)."""
    import device_check

    marker = "pytest." + "mark.cuda"  # split so that this file does not hold it
    elsewhere = [
        path.name
        for path in (ROOT / "tests").glob("test_*.py")
        if path.name != Path(device_check.CUDA_TESTS).name and marker in path.read_text()
    ]
    assert not elsewhere, f"tests marked cuda outside {device_check.CUDA_TESTS}: {elsewhere}; move them there"
