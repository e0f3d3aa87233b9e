"""The Python API: invarbench.evaluate and its Results, on registered models and plain nn.Modules."""

import json

import pytest
import torch
from torch import nn

from invarbench import Results, evaluate
from invarbench.attacks import ThreatModel
from invarbench.cli import main
from invarbench.config import AttackSpec, ModelSpec, RunConfig
from invarbench.errors import ConfigError

SMALL = {"threats": "linf:0.01,0.025", "attacks": ["fgsm", "pgd:steps=5"], "n": 20, "progress": False}


def mlp(seed=0):
    """A plain MLP on the 50-dimensional spheres (inputs in [-1.5, 1.5], 2 classes)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(50, 32), nn.ReLU(), nn.Linear(32, 2))


def test_evaluate_registered_model_to_pandas_matches_summary(tmp_path):
    results = evaluate("spheres-mlp-standard", out=tmp_path, **SMALL)
    assert isinstance(results, Results) and results.run_dir.parent == tmp_path
    frame = results.to_pandas()
    assert list(frame.columns) == [
        "model",
        "dataset",
        "norm",
        "eps",
        "attack",
        "robust_accuracy",
        "n",
        "clean_accuracy",
    ]
    # One row per model x norm x eps x attack, attacks in cascade order.
    assert list(zip(frame["eps"], frame["attack"])) == [
        (0.01, "fgsm"),
        (0.01, "pgd:steps=5"),
        (0.025, "fgsm"),
        (0.025, "pgd:steps=5"),
    ]
    assert (
        set(frame["model"]) == {"spheres-mlp-standard"}
        and set(frame["dataset"]) == {"spheres"}
        and set(frame["n"]) == {20}
    )
    entry = results.summary_dict["models"]["spheres-mlp-standard"]
    for row in frame.itertuples():
        assert row.robust_accuracy == entry["threats"]["linf"][f"{row.eps:g}"]["attacks"][row.attack]["robust_accuracy"]
        assert row.clean_accuracy == entry["clean_accuracy"]
    # ... and the text table shows the same figures.
    lines = results.summary().splitlines()
    assert lines[0].split() == [
        "model",
        "clean",
        "threat",
        "after",
        "fgsm",
        "after",
        "pgd:steps=5",
        "worst",
        "case",
        "check",
        "warnings",
    ]
    for line, eps in zip(lines[2:], (0.01, 0.025)):
        rows = frame[frame["eps"] == eps]
        assert line.split()[4:6] == [f"{100 * value:.1f}%" for value in rows["robust_accuracy"]]
    # Cumulative: robust accuracy never rises along the cascade.
    assert (frame.groupby("eps")["robust_accuracy"].diff().dropna() <= 0).all()
    assert len(results.records) == 2 * 2 * 20 and results.invariance_pandas().empty
    assert Results.load(results.run_dir).to_pandas().equals(frame)


def test_evaluate_plain_module_with_bounds_records_its_sha(tmp_path):
    module = mlp()
    results = evaluate(module, dataset="spheres", bounds=(-1.5, 1.5), out=tmp_path, **SMALL)
    assert list(results.summary_dict["models"]) == ["Sequential"]
    manifest = json.loads((results.run_dir / "manifest.json").read_text())
    (model,) = manifest["config"]["models"]
    assert model["key"] == "Sequential" and model["bounds"] == [-1.5, 1.5] and model["num_classes"] == 2
    assert (
        model["checkpoint_sha256"]
        == manifest["checkpoint_sha256"]["Sequential"]
        == results.summary_dict["models"]["Sequential"]["checkpoint_sha256"]
    )
    assert len(model["checkpoint_sha256"]) == 64
    # The caller's module is evaluated as a copy: not switched to eval mode nor moved.
    assert module.training
    # Other weights are another configuration, so another run directory.
    other = evaluate(mlp(seed=1), dataset="spheres", bounds=(-1.5, 1.5), out=tmp_path, **SMALL)
    assert other.run_dir != results.run_dir


def test_evaluate_same_module_twice_resumes_with_identical_records(tmp_path):
    first = evaluate(mlp(), dataset="spheres", bounds=(-1.5, 1.5), out=tmp_path, **SMALL)
    second = evaluate(mlp(), dataset="spheres", bounds=(-1.5, 1.5), out=tmp_path, **SMALL)
    assert first.jobs_run > 0 and first.jobs_resumed == 0
    assert second.run_dir == first.run_dir and second.jobs_run == 0 and second.jobs_resumed == first.jobs_run
    assert second.records.equals(first.records) and second.summary() == first.summary()


def test_plain_module_without_bounds_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"bounds=\(low, high\)"):
        evaluate(mlp(), dataset="spheres", out=tmp_path, **SMALL)
    assert not any(tmp_path.iterdir())


def test_registered_and_path_models_keep_their_config_digest():
    """Run directories and leaderboard entries of registered and checkpoint models depend on it (the
    digest is the sha256 of to_dict()): no in-memory settings are added to theirs."""
    config = RunConfig(
        (ModelSpec("spheres-mlp-standard", "spheres"), ModelSpec("some/model.pt", "mnist")),
        (ThreatModel("linf", (0.025,)),),
        (AttackSpec("pgd"),),
        n=20,
    )
    assert config.to_dict()["models"] == [
        {
            "reference": "spheres-mlp-standard",
            "key": "spheres-mlp-standard",
            "dataset": "spheres",
            "architecture": None,
            "architecture_args": {},
        },
        {
            "reference": "some/model.pt",
            "key": "model",
            "dataset": "mnist",
            "architecture": None,
            "architecture_args": {},
        },
    ]


def test_cli_run_prints_the_api_summary(tmp_path, capsys):
    arguments = [
        "run",
        "spheres-mlp-standard",
        "--n",
        "20",
        "--threat",
        "linf:0.01,0.025",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert main([*arguments, "--attack", "fgsm", "--attack", "pgd:steps=5", "--attack", "invariance-linf"]) == 0
    printed = capsys.readouterr().out
    results = evaluate(
        "spheres-mlp-standard", out=tmp_path, **{**SMALL, "attacks": ["fgsm", "pgd:steps=5", "invariance-linf"]}
    )
    assert results.jobs_run == 0 and results.jobs_resumed > 0  # the same configuration, the same run directory
    assert printed.startswith(results.summary() + "\n\n")
    assert printed.endswith(f"resumed from disk; results in {results.run_dir} (n=20, seed=0)\n")
    assert "invariance attack" in printed
    invariance = results.invariance_pandas()
    assert list(zip(invariance["attack"], invariance["eps"])) == [("invariance-linf", 0.01), ("invariance-linf", 0.025)]
    metrics = results.summary_dict["models"]["spheres-mlp-standard"]["invariance"]["invariance-linf"]["linf:0.025"]
    assert (
        invariance["label_changed"].iloc[1] == metrics["label_changed"]
        and invariance["invariance_accuracy_ci95_high"].iloc[1] == metrics["invariance_accuracy_ci95"][1]
    )


def test_a_run_of_an_in_memory_model_cannot_become_an_entry(tmp_path):
    from invarbench.leaderboard.entries import add_run

    network = nn.Sequential(nn.Linear(50, 2))
    results = evaluate(
        network,
        dataset="spheres",
        bounds=(-1.5, 1.5),
        threats="linf:0.01",
        attacks=["fgsm"],
        n=10,
        out=tmp_path,
        progress=False,
    )
    with pytest.raises(ConfigError, match="torch.jit.save"):
        add_run(results.run_dir, tmp_path / "entries")
    assert not (tmp_path / "entries").exists() or not any((tmp_path / "entries").iterdir())
