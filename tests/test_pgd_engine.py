"""invarbench's own PGD (attacks/pgd.py): the closed-form optimum on a linear model, nesting over eps,
per-sample early exit, the active mask, determinism, bounds and balls, strength against Foolbox's PGD on
a zoo model, and that stored entries made with Foolbox's PGD are re-checked with it."""

import json

import pandas as pd
import pytest
import torch
from test_attacks import linear_model, linear_problem

from invarbench.attacks import ATTACKS, ThreatModel, create_attack, perturbation_norm
from invarbench.cli import main
from invarbench.config import AttackSpec, ModelSpec, RunConfig, entry_config, rerun_as
from invarbench.errors import ConfigError
from invarbench.leaderboard.entries import add_run
from invarbench.models import BenchmarkModel, load_model
from invarbench.runner import run_benchmark

STRONG = {"steps": 100, "rel_stepsize": 0.05}


class Recorder(torch.nn.Module):
    """The network of a model, keeping a copy of every batch it is given."""

    def __init__(self, network):
        super().__init__()
        self.network, self.batches = network, []

    def forward(self, x):
        self.batches.append(x.detach().clone())
        return self.network(x)


def recorded(model):
    recorder = Recorder(model.network)
    return BenchmarkModel(recorder, bounds=model.bounds, num_classes=model.num_classes).eval(), recorder


def appearances(recorder, x):
    """How many forward passes each point of ``x`` was in (each input row belongs to its nearest point)."""
    counts = torch.zeros(len(x), dtype=torch.long)
    for batch in recorder.batches:
        nearest = torch.cdist(batch.flatten(1), x.flatten(1), p=float("inf")).argmin(1)
        counts += torch.bincount(nearest, minlength=len(x))
    return counts


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_reaches_the_closed_form_optimum_on_a_linear_model(norm):
    model, x, labels, minimal = linear_problem(norm)
    for point in range(len(labels)):
        eps = (0.97 * minimal[point].item(), 1.03 * minimal[point].item())
        result = create_attack("pgd", **STRONG)(
            model, x[point : point + 1], labels[point : point + 1], norm=norm, epsilons=eps
        )
        assert result.success[:, 0].tolist() == [False, True], (norm, point)
        assert (result.norms[:, 0] <= torch.tensor(eps) + 1e-6).all()
        assert result.margins[1, 0] < 0 < result.margins[0, 0]
    assert (
        result.options["implementation"] == "invarbench"
        and result.options["steps"] == 100
        and result.options["random_start"]
    )


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_points_broken_at_a_smaller_eps_are_not_attacked_again_and_leave_the_batch(norm):
    model, x, labels, minimal = linear_problem(norm, count=20)
    model, recorder = recorded(model)
    epsilons = (1.03 * minimal.quantile(0.3).item(), 1.03 * minimal.quantile(0.7).item())
    steps = 20
    result = create_attack("pgd", steps=steps, rel_stepsize=0.1)(model, x, labels, norm=norm, epsilons=epsilons)
    assert (result.success[1] | ~result.success[0]).all(), "success must be monotone in eps"
    assert torch.equal(result.adversarials[1][result.success[0]], result.adversarials[0][result.success[0]])
    counts = appearances(recorder, x)
    # The clean pass, then one pass per iterate (steps + 1 per eps) while a point is in the working batch.
    first, second, never = result.success[0], result.success[1] & ~result.success[0], ~result.success[1]
    assert first.any() and second.any() and never.any()
    assert (counts[first] <= 1 + steps + 1).all(), "points broken at the smaller eps were attacked at the larger one"
    assert (counts[second] > 1 + steps + 1).all() and (counts[second] < 1 + 2 * (steps + 1)).all()
    assert (counts[never] == 1 + 2 * (steps + 1)).all()
    # Broken points leave as soon as an iterate breaks them: the batch shrinks.
    sizes = [len(batch) for batch in recorder.batches]
    assert sizes[0] == 20 and min(sizes) < sizes[1]


def test_restarts_run_only_on_points_still_robust():
    model, x, labels, minimal = linear_problem("linf", count=20)
    model, recorder = recorded(model)
    eps = 1.03 * minimal.median().item()
    steps, restarts = 10, 3
    result = create_attack("pgd", steps=steps, rel_stepsize=0.1, restarts=restarts)(
        model, x, labels, norm="linf", epsilons=(eps,)
    )
    counts = appearances(recorder, x)
    assert result.success[0].any() and not result.success[0].all()
    assert (counts[result.success[0]] <= 1 + steps + 1).all()
    assert (counts[~result.success[0]] == 1 + restarts * (steps + 1)).all()


def test_the_active_mask_is_respected():
    model, x, labels, minimal = linear_problem("linf", count=12)
    model, recorder = recorded(model)
    epsilons = (0.5 * minimal.min().item(), 2 * minimal.max().item())
    active = torch.ones(2, 12, dtype=torch.bool)
    active[:, :4] = False  # never attacked
    active[0, 4:8] = False  # attacked only at the larger eps
    steps = 10
    result = create_attack("pgd", steps=steps)(model, x, labels, norm="linf", epsilons=epsilons, active=active)
    counts = appearances(recorder, x)
    assert (counts[:4] == 1).all(), "points inactive at every eps must only get the clean pass"
    assert (result.norms[:, :4] == 0).all() and not result.success[:, :4].any()
    assert (counts[4:8] <= 1 + steps + 1).all() and result.success[1, 4:].all()
    assert not result.success[0].any()


def test_the_same_seed_repeats_and_another_seed_draws_other_starts():
    model, _ = linear_model(seed=1)
    x = torch.randn(60, 30) * 0.2
    labels = model(x).argmax(1).detach()
    attack = create_attack("pgd", steps=1, rel_stepsize=0.01)
    first, again, other = (
        attack(model, x, labels, norm="linf", epsilons=(0.01, 0.02), seed=seed) for seed in (3, 3, 4)
    )
    assert (
        torch.equal(first.success, again.success)
        and torch.equal(first.adversarials, again.adversarials)
        and torch.equal(first.margins, again.margins)
    )
    assert not torch.equal(first.adversarials, other.adversarials)
    assert not torch.equal(first.success, other.success), (
        "one step from a random start: the outcome depends on the start"
    )


@pytest.mark.parametrize("norm,epsilons", [("linf", (0.05, 0.1, 0.3)), ("l2", (0.5, 1.0, 2.0))])
def test_examples_stay_in_the_bounds_and_the_ball(mnist, norm, epsilons):
    images, labels = mnist.evaluation_subset(30)
    result = create_attack("pgd", steps=10)(
        load_model("mnist-cnn-standard"), images, labels, norm=norm, epsilons=epsilons
    )
    for index, eps in enumerate(epsilons):
        examples = result.adversarials[index]
        assert examples.min() >= 0 and examples.max() <= 1
        sizes = perturbation_norm(examples - images, norm)
        assert (sizes <= eps + 1e-6).all() and torch.allclose(sizes, result.norms[index])
        assert ((result.margins[index] < 0) == result.success[index]).all()
    assert (result.success[1:] | ~result.success[:-1]).all()


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 2.0)])
def test_pgd_is_not_weaker_than_foolbox_pgd_on_the_robust_zoo_model(mnist, norm, eps):
    images, labels = mnist.evaluation_subset(100)
    model = load_model("mnist-cnn-pgd-linf-0.3")
    ours = create_attack("pgd")(model, images, labels, norm=norm, epsilons=(eps,))
    foolbox = create_attack("foolbox-pgd")(model, images, labels, norm=norm, epsilons=(eps,))
    assert ours.robust_accuracy()[0] <= foolbox.robust_accuracy()[0] + 0.02
    assert "foolbox" in foolbox.options["implementation"] and ours.options["implementation"] == "invarbench"


def test_bad_options_name_the_option_and_the_fix():
    for options, message in [
        ({"restarts": 0}, "restarts=0"),
        ({"steps": 0}, "steps=0"),
        ({"rel_stepsize": -0.1}, "must be positive"),
        ({"batch_size": 0}, "batch_size=0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            create_attack("pgd", **options)
    assert ATTACKS["pgd"].__module__.endswith("attacks.pgd") and "foolbox" in ATTACKS["foolbox-pgd"].__module__


def test_runs_record_the_engine_and_entries_without_it_are_checked_with_foolbox_pgd(
    tmp_path, isolated_registry, monkeypatch
):
    assert RunConfig(
        (ModelSpec("spheres-mlp-pgd-linf", "spheres"),),
        (ThreatModel("linf", (0.02,)),),
        (AttackSpec("pgd"), AttackSpec("fgsm")),
    ).to_dict()["attacks"] == [
        {"name": "pgd", "options": {}, "implementation": "invarbench"},
        {"name": "fgsm", "options": {}},
    ]
    assert rerun_as({"name": "pgd", "options": {}}) == "foolbox-pgd"
    assert rerun_as({"name": "pgd", "options": {}, "implementation": "invarbench"}) == "pgd"
    assert rerun_as({"name": "fgsm", "options": {}}) == "fgsm"
    # An entry as stored before this engine: Foolbox's PGD run under the name pgd (so its label and seeds),
    # its settings recording no implementation.
    isolated_registry("spheres-mlp-pgd-linf")
    config = RunConfig(
        (ModelSpec("spheres-mlp-pgd-linf", "spheres"),),
        (ThreatModel("linf", (0.02, 0.05)),),
        (AttackSpec("pgd", (("steps", 10),), runs_as="foolbox-pgd"),),
        n=40,
        shard_size=20,
    )
    run_benchmark(config, tmp_path / "runs", name="run", progress=False)
    entries = tmp_path / "entries"
    add_run(tmp_path / "runs" / "run", entries)
    stem = "spheres-mlp-pgd-linf__spheres__perturbation"
    entry = json.loads((entries / f"{stem}.json").read_text())
    assert entry["settings"]["attacks"] == [{"name": "pgd", "options": {"steps": 10}}]
    assert set(pd.read_parquet(entries / f"{stem}.parquet")["attack"]) == {"pgd"}
    # Re-run under the entry's name: the label, and so the jobs' seeds, are those that made the records.
    assert entry_config(entry, 40).attacks == (AttackSpec("pgd", (("steps", 10),), runs_as="foolbox-pgd"),)
    engines = []
    for name in ("pgd", "foolbox-pgd"):
        monkeypatch.setattr(
            ATTACKS[name],
            "run",
            lambda self, *args, original=ATTACKS[name].run, **kwargs: (
                engines.append(self.name) or original(self, *args, **kwargs)
            ),
        )
    assert main(["check", stem, "--entries", str(entries), "--no-progress"]) == 0
    assert set(engines) == {"foolbox-pgd"}
