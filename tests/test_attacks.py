import pytest
import torch

from invarbench.attacks import ATTACKS, ThreatModel, create_attack
from invarbench.errors import ConfigError
from invarbench.models import BenchmarkModel, load_model

DUAL = {"linf": 1, "l2": 2}


def linear_model(dim=30, seed=0):
    """Two logits [0, w.x + b]: the decision function is linear, so the smallest adversarial
    perturbation is known in closed form: |w.x + b| / ||w||_1 for l_inf and / ||w||_2 for l_2."""
    torch.manual_seed(seed)
    w = torch.randn(dim)
    layer = torch.nn.Linear(dim, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.stack([torch.zeros(dim), w]))
        layer.bias.copy_(torch.tensor([0.0, 0.3]))
    # Wide bounds keep the optimum interior, where the closed form holds.
    return BenchmarkModel(layer, bounds=(-10.0, 10.0), num_classes=2).eval(), w


def linear_problem(norm, count=6):
    model, w = linear_model()
    x = torch.randn(count, 30) * 0.2
    with torch.no_grad():
        logits = model(x)
    return model, x, logits.argmax(1), logits[:, 1].abs() / w.norm(p=DUAL[norm])


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize(
    "attack,options",
    [
        ("fgsm", {}),
        ("pgd", {"steps": 100, "rel_stepsize": 0.05}),
        ("foolbox-pgd", {"steps": 100, "rel_stepsize": 0.05}),
        ("autoattack", {"version": "custom", "attacks": ["apgd-ce", "fab"]}),
    ],
)
def test_attack_reaches_the_closed_form_optimum_on_a_linear_model(norm, attack, options):
    model, x, labels, minimal = linear_problem(norm)
    for point in range(len(labels)):
        eps = (0.97 * minimal[point].item(), 1.03 * minimal[point].item())
        result = create_attack(attack, **options)(
            model, x[point : point + 1], labels[point : point + 1], norm=norm, epsilons=eps
        )
        assert result.success[:, 0].tolist() == [False, True], (attack, norm, point)
        assert result.norms[1, 0] <= eps[1] * (1 + 1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fmn_finds_the_closed_form_minimal_norm(norm):
    model, x, labels, minimal = linear_problem(norm, count=20)
    attack = create_attack("fmn", steps=200)
    found, _ = attack.minimal_norms(model, x, labels, norm=norm)
    assert (found >= minimal * (1 - 1e-4)).all(), "no attack can beat the closed-form optimum"
    assert (found <= minimal * 1.02).all()
    result = attack(model, x, labels, norm=norm, epsilons=(0.5 * minimal.median().item(), 2 * minimal.max().item()))
    assert result.success[1].all() and not result.success[0].all()


def test_autoattack_with_two_classes_leaves_out_dlr_attacks():
    model, x, labels, minimal = linear_problem("linf", count=8)
    result = create_attack("autoattack")(model, x, labels, norm="linf", epsilons=(1.05 * minimal.max().item(),))
    assert result.success.all()
    assert result.options["left_out_for_num_classes"] == ["apgd-t"] and result.options["n_target_classes"] == 1
    assert "apgd-ce" in result.options["sub_attacks"]


def test_foolbox_pgd_restarts_only_add_successes_and_runs_repeat():
    model, _ = linear_model(seed=1)
    x = torch.randn(60, 30) * 0.2
    labels = model(x).argmax(1).detach()
    single = create_attack("foolbox-pgd", steps=5)(model, x, labels, norm="linf", epsilons=(0.01, 0.02), seed=3)
    repeated = create_attack("foolbox-pgd", steps=5)(model, x, labels, norm="linf", epsilons=(0.01, 0.02), seed=3)
    assert torch.equal(single.success, repeated.success)
    several = create_attack("foolbox-pgd", steps=5, restarts=3)(
        model, x, labels, norm="linf", epsilons=(0.01, 0.02), seed=3
    )
    assert (several.success | ~single.success).all()
    assert single.robust_accuracy()[0] >= single.robust_accuracy()[1]
    assert (
        several.options["restarts"] == 3
        and several.options["steps"] == 5
        and "foolbox" in several.options["implementation"]
    )


def test_threat_specifications():
    assert ThreatModel.parse("linf:0.3,0.1") == ThreatModel("linf", (0.1, 0.3))
    assert str(ThreatModel.parse("L2:2")) == "l2:2"
    for spec, message in [
        ("linf", "no eps values"),
        ("l1:0.3", "unknown norm 'l1'"),
        ("linf:0.1,abc", "numbers separated by commas"),
        ("linf:-0.1", "positive"),
        ("linf:0.1,0.1", "repeats"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ThreatModel.parse(spec)
    with pytest.raises(ConfigError, match="eps 1.5 for linf is out of range"):
        ThreatModel.parse("linf:1.5").check_against_bounds((0.0, 1.0), 784)
    ThreatModel.parse("l2:2").check_against_bounds((0.0, 1.0), 784)


def test_unknown_attack_and_bad_options():
    assert {"fgsm", "pgd", "foolbox-pgd", "fmn", "autoattack"} <= set(ATTACKS)
    with pytest.raises(ConfigError, match="Did you mean pgd"):
        create_attack("pgdd")
    with pytest.raises(ConfigError, match="does not accept the options"):
        create_attack("pgd", step=3)
    with pytest.raises(ConfigError, match="restarts=0"):
        create_attack("pgd", restarts=0)
    with pytest.raises(ConfigError, match="unknown version"):
        create_attack("autoattack", version="fast")
    with pytest.raises(ConfigError, match="unknown sub-attacks"):
        create_attack("autoattack", version="custom", attacks=["apgd-xx"])
    model, x, labels, _ = linear_problem("linf")
    with pytest.raises(ConfigError, match="does not support norm 'l1'"):
        create_attack("pgd")(model, x, labels, norm="l1", epsilons=(0.1,))


def test_standard_mnist_model_is_not_robust_at_eps_03(mnist):
    images, labels = mnist.evaluation_subset(100)
    result = create_attack("pgd")(load_model("mnist-cnn-standard"), images, labels, norm="linf", epsilons=(0.3,))
    assert result.robust_accuracy()[0] <= 0.05
    assert (result.norms <= 0.3 + 1e-6).all()


@pytest.mark.slow
def test_foolbox_pgd_and_autoattack_agree_on_the_robust_zoo_model(robust_zoo_reference):
    model, images, labels, autoattack = robust_zoo_reference
    pgd = create_attack("foolbox-pgd", restarts=2)(model, images, labels, norm="linf", epsilons=(0.3,))
    assert abs(pgd.robust_accuracy()[0] - autoattack.robust_accuracy()[0]) <= 0.06
    assert autoattack.robust_accuracy()[0] >= 0.7


def test_autoattack_resumes_from_the_official_state_file(tmp_path):
    from pyautoattack.state import EvaluationState

    model, x, labels, minimal = linear_problem("linf", count=6)
    eps = 1.05 * minimal.max().item()
    attack = create_attack("autoattack", version="custom", attacks=["apgd-ce", "fab"])
    # What pyautoattack leaves behind when killed after APGD-CE: flags of the points still robust.
    state = EvaluationState({"apgd-ce", "fab"}, path=tmp_path / f"autoattack-linf-{eps:g}.json")
    state.robust_flags = torch.tensor([False, True, True, True, True, True])
    state.add_run_attack("apgd-ce")
    state.to_disk(force=True)
    result = attack(model, x, labels, norm="linf", epsilons=(eps,), workspace=tmp_path)
    assert result.success.all()
    assert result.adversarial_predictions[0, 0] == -1 and torch.isnan(result.norms[0, 0]), (
        "broken before the interruption: label and norm unknown"
    )
    assert (result.adversarial_predictions[0, 1:] != labels[1:]).all() and (
        result.norms[0, 1:] <= eps * (1 + 1e-5)
    ).all()


@pytest.mark.slow
def test_fmn_restarts_points_it_found_nothing_for_from_another_class(mnist):
    model = load_model("mnist-cnn-standard")
    images, labels = mnist.evaluation_subset(40)
    correct = model(images).argmax(1) == labels
    plain, _ = create_attack("fmn", restart=False).minimal_norms(model, images, labels, norm="l2")
    assert not torch.isfinite(plain[correct]).all(), (
        "started at the clean point, l2 FMN misses some points (the reason for restarts)"
    )
    norms, predictions = create_attack("fmn").minimal_norms(model, images, labels, norm="l2")
    assert torch.isfinite(norms[correct]).all(), "with restarts every correctly classified point gets an adversarial"
    assert (predictions[correct] != labels[correct]).all()
    found = torch.isfinite(plain)
    assert (norms[found] <= plain[found] * (1 + 1e-6)).all(), "points found without a restart keep their norm"


class Staircase(torch.nn.Module):
    """Class 1 once 15 of 20 inputs reach 0.5: the input gradient is zero everywhere, so only a
    search (Square) breaks points that the gradient attacks leave."""

    def forward(self, x):
        count = torch.round(x).sum(1, keepdim=True)
        return torch.cat([torch.zeros_like(count), count - 14.5, -torch.ones_like(count)], 1)


def test_autoattack_keeps_its_own_reliability_warnings():
    from invarbench.attacks.autoattack import reliability_flag

    model = BenchmarkModel(Staircase(), bounds=(0.0, 1.0), num_classes=3).eval()
    generator = torch.Generator().manual_seed(1)
    x = 0.3 + 0.19 * torch.rand(20, 20, generator=generator)
    y = model(x).argmax(1)
    result = create_attack("autoattack", version="custom", attacks=["apgd-ce", "apgd-dlr", "square"])(
        model, x, y, norm="linf", epsilons=(0.3,)
    )
    assert bool(result.success.all())
    flags = {reliability_flag(message) for message in result.warnings}
    assert {"zero_gradients", "square_beats_white_box"} <= flags
    assert all(message.startswith("eps 0.3: ") for message in result.warnings)
    # A model with useful gradients raises none of them.
    linear, x, labels, _ = linear_problem("linf")
    clean = create_attack("autoattack", version="custom", attacks=["apgd-ce", "square"])(
        linear, x, labels, norm="linf", epsilons=(0.5,)
    )
    assert not {reliability_flag(message) for message in clean.warnings} & {"zero_gradients", "square_beats_white_box"}


def test_fixed_eps_attacks_report_the_margin_at_their_examples():
    model, x, labels, optimum = linear_problem("linf")
    epsilons = (0.5 * float(optimum.min()), 2.0 * float(optimum.max()))
    result = create_attack("pgd", steps=50)(model, x, labels, norm="linf", epsilons=epsilons)
    assert result.margins is not None and result.margins.shape == result.success.shape
    # Below every point's optimal eps nothing breaks, above it everything does; the margin's sign says which.
    assert not bool(result.success[0].any()) and bool(result.success[1].all())
    assert torch.equal(result.margins < 0, result.success)
