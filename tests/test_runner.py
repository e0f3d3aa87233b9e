import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from invarbench.attacks import ThreatModel
from invarbench.cli import EXIT_FAILURE, main
from invarbench.config import AttackSpec, ModelSpec, RunConfig, default_threats, merge_threats
from invarbench.errors import ConfigError, ModelError
from invarbench.models import build_architecture
from invarbench.plan import plan
from invarbench.runner import run_benchmark
from invarbench.store import RunLock

SPHERES = ModelSpec("spheres-mlp-standard", "spheres")


def small_config(**overrides):
    options = dict(
        models=(SPHERES,),
        threats=(ThreatModel("linf", (0.02, 0.025)),),
        attacks=(AttackSpec("fgsm"), AttackSpec("pgd", (("steps", 10),))),
        n=60,
        seed=0,
        shard_size=20,
    )
    options.update(overrides)
    return RunConfig(**options)


def test_run_writes_manifest_records_and_a_consistent_summary(tmp_path):
    outcome = run_benchmark(small_config(), tmp_path, name="run", progress=False)
    run_dir = tmp_path / "run"
    assert {path.name for path in run_dir.iterdir()} >= {"manifest.json", "results.parquet", "summary.json", "jobs"}
    assert not (run_dir / "run.lock").exists()
    assert not list(run_dir.glob("state/*")), "finished jobs leave no resume state behind"
    records = pd.read_parquet(run_dir / "results.parquet")
    assert len(records) == 60 * 2 * 2  # points x eps x attacks
    model = outcome.summary["models"]["spheres-mlp-standard"]
    assert model["clean_correct"] == int(
        (records.drop_duplicates("index")["clean_prediction"] == records.drop_duplicates("index")["label"]).sum()
    )
    for eps in ("0.02", "0.025"):
        result = model["threats"]["linf"][eps]
        after_fgsm, after_pgd = result["attacks"]["fgsm"]["robust"], result["attacks"]["pgd:steps=10"]["robust"]
        assert after_pgd <= after_fgsm
        assert result["worst_case"]["robust"] == after_pgd
        broken = records[(records["eps"] == float(eps)) & records["success"].fillna(False)]
        assert model["clean_correct"] - broken["index"].nunique() == after_pgd
    # The cascade: PGD only ran on points FGSM left robust.
    pgd = records[(records["attack"] == "pgd") & (records["eps"] == 0.025)]
    fgsm_broken = set(
        records[(records["attack"] == "fgsm") & (records["eps"] == 0.025) & records["success"].fillna(False)]["index"]
    )
    assert set(pgd[pgd["ran"]]["index"]).isdisjoint(fgsm_broken)
    import json

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["versions"]["foolbox"] == "3.3.4"
    assert manifest["checkpoint_sha256"]["spheres-mlp-standard"] == model["checkpoint_sha256"]
    assert set(manifest["timings_seconds"]["spheres-mlp-standard"]) == {"fgsm", "pgd:steps=10"}


def test_rerun_resumes_everything_from_disk_with_identical_results(tmp_path):
    first = run_benchmark(small_config(), tmp_path, name="run", progress=False)
    before = pd.read_parquet(tmp_path / "run" / "results.parquet")
    second = run_benchmark(small_config(), tmp_path, name="run", progress=False)
    assert second.jobs_run == 0 and second.jobs_resumed == first.jobs_run == len(plan(small_config()))
    pd.testing.assert_frame_equal(before, pd.read_parquet(tmp_path / "run" / "results.parquet"))


def test_no_cascade_attacks_every_correct_point(tmp_path):
    run_benchmark(small_config(cascade=False), tmp_path, name="run", progress=False)
    records = pd.read_parquet(tmp_path / "run" / "results.parquet")
    correct = records["clean_prediction"] == records["label"]
    assert (records["ran"] == correct).all()


def command(out, name):
    return [
        sys.executable,
        "-m",
        "invarbench.cli",
        "run",
        "spheres-mlp-standard",
        "--threat",
        "linf:0.02,0.025",
        "--attack",
        "fgsm",
        "--attack",
        "pgd:steps=20",
        "--n",
        "600",
        "--shard-size",
        "10",
        "--out",
        str(out),
        "--name",
        name,
        "--no-progress",
    ]


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_the_uninterrupted_results(tmp_path):
    uninterrupted = subprocess.run(command(tmp_path, "whole"), capture_output=True, text=True)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    process = subprocess.Popen(command(tmp_path, "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jobs = tmp_path / "killed" / "jobs"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not jobs.exists() or len(list(jobs.glob("*.parquet"))) < 5):
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(jobs.glob("*.parquet")))
    total = 2 * 60
    assert 5 <= done < total, "the run must be killed part-way"
    assert not (tmp_path / "killed" / "results.parquet").exists()
    assert (tmp_path / "killed" / "run.lock").exists(), "a killed run leaves its lock behind"
    resumed = subprocess.run(command(tmp_path, "killed"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{total - done} jobs run, {done} resumed from disk" in resumed.stdout
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "whole" / "results.parquet"),
        pd.read_parquet(tmp_path / "killed" / "results.parquet"),
    )
    assert not list((tmp_path / "killed").rglob("*.tmp"))


def test_a_live_lock_refuses_a_second_writer(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.lock").write_text(f"{os.getpid()} host\n")
    with pytest.raises(ConfigError, match=f"another invarbench run \\(pid {os.getpid()}\\) is writing into"):
        run_benchmark(small_config(), tmp_path, name="run", progress=False)
    assert (tmp_path / "run" / "run.lock").read_text().startswith(str(os.getpid()))


def test_a_stale_lock_is_taken_over(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.lock").write_text(f"{finished.stdout.strip()} host\n")
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / "run.lock").read_text().startswith(str(os.getpid()))
    assert not (tmp_path / "run" / "run.lock").exists()


def test_another_configuration_in_the_same_directory_is_refused(tmp_path):
    run_benchmark(small_config(), tmp_path, name="run", progress=False)
    with pytest.raises(ConfigError, match="different configuration"):
        run_benchmark(small_config(seed=1), tmp_path, name="run", progress=False)


def test_defaults_and_threat_merging():
    assert default_threats((ModelSpec("mnist-cnn-pgd-linf-0.3", "mnist"),)) == (ThreatModel("linf", (0.3,)),)
    assert default_threats(
        (
            ModelSpec("mnist-cnn-standard", "mnist"),
            ModelSpec("mnist-cnn-pgd-linf-0.4", "mnist"),
            ModelSpec("mnist-cnn-pgd-l2-2.0", "mnist"),
        )
    ) == (ThreatModel("linf", (0.3, 0.4)), ThreatModel("l2", (2.0,)))
    assert merge_threats([ThreatModel.parse("linf:0.1"), ThreatModel.parse("linf:0.3,0.1")]) == (
        ThreatModel("linf", (0.1, 0.3)),
    )
    assert (
        RunConfig((SPHERES,), (ThreatModel("linf", (0.1,)),), (AttackSpec("pgd"),)).default_name()
        == RunConfig((SPHERES,), (ThreatModel("linf", (0.1,)),), (AttackSpec("pgd"),)).default_name()
    )


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["spheres-mlp-standard", "--attack", "pgdd"], "unknown attack 'pgdd'.*Did you mean pgd"),
        (["spheres-mlp-standard", "--attack", "pgd:restarts"], "options are key=value pairs"),
        (["spheres-mlp-standard", "--attack", "pgd:stepz=3"], "does not accept the options"),
        (["spheres-mlp-standard", "--threat", "linf"], "has no eps values"),
        (["spheres-mlp-standard", "--threat", "l3:0.1"], "unknown norm 'l3'"),
        (["spheres-mlp-standard", "--threat", "linf:0.5,x"], "numbers separated by commas"),
        (
            ["mnist-cnn-standard", "--threat", "linf:1.2"],
            "eps 1.2 for linf is out of range for inputs in \\[0.0, 1.0\\]",
        ),
        (["mnist-cnn-standard", "--threat", "linf:0"], "every eps must be positive"),
        (["no/such/checkpoint.pt"], "checkpoint path must point to an existing file"),
        (["spheres-mlp-standard", "--n", "0"], "must be positive"),
        (["spheres-mlp-standard", "spheres-mlp-standard"], "repeat a name"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(tmp_path, capsys, arguments, message):
    assert (
        main(
            ["run", *arguments, "--out", str(tmp_path), "--n", "10", "--no-progress"]
            if "--n" not in arguments
            else ["run", *arguments, "--out", str(tmp_path), "--no-progress"]
        )
        == EXIT_FAILURE
    )
    error = capsys.readouterr().err
    assert error.startswith("invarbench: error:")
    import re

    assert re.search(message, error), error


class FiveOutputs(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :5]


class Probabilities(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.network = build_architecture("mlp", input_dim=784, hidden=[16], num_classes=10)

    def forward(self, x):
        return self.network(x).softmax(dim=1)


def test_model_with_wrong_output_shape(tmp_path, mnist):
    path = tmp_path / "five.pt"
    torch.jit.save(torch.jit.script(FiveOutputs()), str(path))
    with pytest.raises(ModelError, match="returns outputs of shape \\(10, 5\\) for 10 inputs; expected \\(10, 10\\)"):
        run_benchmark(
            RunConfig((ModelSpec(str(path), "mnist"),), (ThreatModel("linf", (0.3,)),), (AttackSpec("fgsm"),), n=10),
            tmp_path,
            progress=False,
        )


def test_model_checks_are_reported_as_flags(tmp_path, mnist):
    path = tmp_path / "softmax.pt"
    torch.jit.save(torch.jit.script(Probabilities().train()), str(path))
    outcome = run_benchmark(
        RunConfig((ModelSpec(str(path), "mnist"),), (ThreatModel("linf", (0.1,)),), (AttackSpec("fgsm"),), n=20),
        tmp_path,
        progress=False,
    )
    flags = outcome.summary["models"]["softmax"]["checks"]
    assert flags["probability_outputs"] and not flags["randomised_outputs"] and not flags["non_finite_outputs"]
    assert any("probabilities" in warning for warning in outcome.summary["models"]["softmax"]["warnings"])


def test_an_attack_can_be_restricted_to_some_eps_and_keep_the_cascade(tmp_path):
    config = small_config(attacks=(AttackSpec("fgsm"), AttackSpec.parse("pgd:steps=10,eps=0.025")))
    outcome = run_benchmark(config, tmp_path, name="run", progress=False)
    records = pd.read_parquet(tmp_path / "run" / "results.parquet")
    pgd = records[records["attack"] == "pgd"]
    assert set(pgd["eps"]) == {0.025}, "PGD ran only at the eps it was restricted to"
    fgsm = records[(records["attack"] == "fgsm") & (records["eps"] == 0.025)]
    still_robust = int((fgsm["ran"] & ~fgsm["success"].fillna(False).astype(bool)).sum())
    assert int(pgd["ran"].sum()) == still_robust, "the cascade still spares PGD the points FGSM broke at that eps"
    threats = outcome.summary["models"]["spheres-mlp-standard"]["threats"]["linf"]
    assert list(threats["0.02"]["attacks"]) == ["fgsm"] and list(threats["0.025"]["attacks"]) == [
        "fgsm",
        "pgd:steps=10,eps=0.025",
    ]
    with pytest.raises(ConfigError, match="no --threat configures"):
        run_benchmark(small_config(attacks=(AttackSpec.parse("pgd:eps=0.3"),)), tmp_path, name="other", progress=False)


def test_cascade_false_runs_an_attack_on_every_correct_point(tmp_path):
    config = small_config(attacks=(AttackSpec("fgsm"), AttackSpec.parse("pgd:steps=10,cascade=false")))
    outcome = run_benchmark(config, tmp_path, name="run", progress=False)
    records = pd.read_parquet(tmp_path / "run" / "results.parquet")
    pgd = records[records["attack"] == "pgd"]
    clean_correct = outcome.summary["models"]["spheres-mlp-standard"]["clean_correct"]
    assert int(pgd[pgd["eps"] == 0.025]["ran"].sum()) == clean_correct


def test_cli_table_shows_each_attack_in_its_own_column_and_a_dash_where_it_did_not_run(tmp_path, capsys):
    from invarbench.cli import main

    code = main(
        [
            "run",
            "spheres-mlp-standard",
            "--threat",
            "linf:0.02,0.025",
            "--attack",
            "pgd:steps=10,eps=0.025",
            "--attack",
            "fgsm",
            "--n",
            "40",
            "--shard-size",
            "20",
            "--out",
            str(tmp_path),
            "--name",
            "r",
            "--no-progress",
        ]
    )
    assert code == 0
    lines = [
        line.split()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("model", "spheres-mlp-standard"))
    ]
    header, rows = lines[0], {row[3]: row for row in lines[1:]}
    assert header[:8] == ["model", "clean", "threat", "after", "pgd:steps=10,eps=0.025", "after", "fgsm", "worst"]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())["models"]["spheres-mlp-standard"]["threats"][
        "linf"
    ]
    assert rows["0.02"][4] == "-", "PGD did not run at 0.02: a dash, not FGSM's figure shifted left"
    assert rows["0.02"][5] == f"{100 * summary['0.02']['attacks']['fgsm']['robust_accuracy']:.1f}%"
    assert rows["0.025"][4] == f"{100 * summary['0.025']['attacks']['pgd:steps=10,eps=0.025']['robust_accuracy']:.1f}%"
    assert rows["0.025"][5] == f"{100 * summary['0.025']['attacks']['fgsm']['robust_accuracy']:.1f}%"
