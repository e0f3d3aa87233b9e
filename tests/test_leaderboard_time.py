"""benchmarks/leaderboard_time.py reads `make leaderboard`'s run folders into the breakdown docs/speed.md shows."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(runs: Path, name: str, model: str, attacks: dict, wall: float, status: str = "complete") -> None:
    folder = runs / name
    folder.mkdir(parents=True)
    manifest = {
        "status": status,
        "created": "2026-12-05T10:00:00+00:00",
        "finished": "2026-12-05T10:30:00+00:00",
        "executor": {"name": "ray", "workers": 2, "threads_per_worker": 1},
        "timings_seconds": {model: attacks},
        "jobs_wall_seconds": wall,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_breakdown_sums_each_models_runs_and_names_a_missing_one(tmp_path, monkeypatch, capsys):
    timing, report = _module("leaderboard_time"), _module("report")
    runs = tmp_path / "runs"
    _run(runs, "zoo-1000-a", "a", {"pgd": 30.0, "aa-fast:eps=[0.3, 2.0]": 500.0}, 300.0)
    _run(runs, "invariance-500-a", "a", {"metameric": 80.0}, 45.0)
    out = tmp_path / "leaderboard_time.json"
    argv = ["leaderboard_time.py", "--wall", "400", "--runs", str(runs), "--models", "a", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    timing.main()
    written = json.loads(out.read_text())
    assert [(row["track"], row["jobs_wall_seconds"]) for row in written["rows"]] == [
        ("perturbation", 300.0),
        ("invariance", 45.0),
    ]
    assert written["arguments"]["PERTURBATION"][:2] == ["--threat", "linf:0.1,0.2,0.3,0.4"]
    table = report._leaderboard_time(written)
    assert "| `a` | perturbation | PERTURBATION | 300 | pgd 30, aa-fast:eps=[0.3, 2.0] 500 |" in table
    assert "INVARIANCE `--threat linf:0.3,0.4" in table and "SPHERES_" not in table
    assert "Whole command: 400 s (0.11 h" in table and "of which the runs' jobs 345 s" in table
    # A model whose run is missing or unfinished stops the script with the folder named.
    monkeypatch.setattr(sys, "argv", [*argv[:-4], "--models", "a", "b", "--out", str(out)])
    with pytest.raises(SystemExit, match="zoo-1000-b has no manifest.json"):
        timing.main()
    _run(runs, "zoo-1000-b", "b", {"pgd": 1.0}, 1.0, status="running")
    with pytest.raises(SystemExit, match="status 'running'; finish the run"):
        timing.main()
    # A spheres model's runs carry the names and settings of the Makefile's spheres loop.
    _run(runs, "spheres-1000-spheres-mlp-standard", "spheres-mlp-standard", {"pgd": 2.0}, 2.0)
    _run(runs, "invariance-1000-spheres-mlp-standard", "spheres-mlp-standard", {"invariance-linf": 3.0}, 3.0)
    monkeypatch.setattr(sys, "argv", [*argv[:-4], "--models", "a", "spheres-mlp-standard", "--out", str(out)])
    timing.main()
    written = json.loads(out.read_text())
    assert [row["settings"] for row in written["rows"]][2:] == ["SPHERES_PERTURBATION", "SPHERES_INVARIANCE"]
    assert "SPHERES_PERTURBATION `--threat linf:0.025 --attack pgd" in report._leaderboard_time(written)


def test_the_run_names_are_read_from_the_makefiles_regenerate_calls(tmp_path):
    """The breakdown finds `make leaderboard`'s runs by the names the Makefile's `regenerate` calls give them,
    read from the Makefile, not from a second copy; a Makefile without such a call is an error naming it."""
    timing = _module("leaderboard_time")
    calls = timing.regenerate_calls()
    assert calls["ZOO"] == {
        "perturbation": ("zoo-1000-{model}", "PERTURBATION"),
        "invariance": ("invariance-500-{model}", "INVARIANCE"),
    }
    assert calls["SPHERES"]["invariance"] == ("invariance-1000-{model}", "SPHERES_INVARIANCE")
    makefile = tmp_path / "Makefile"
    makefile.write_text("leaderboard:\n\techo nothing\n")
    with pytest.raises(SystemExit, match="no `\\$\\(call regenerate"):
        timing.regenerate_calls(makefile)
