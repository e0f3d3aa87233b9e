import pytest
import torch

from invarbench.attacks.pgd import pgd
from invarbench.errors import ConfigError
from invarbench.models import BenchmarkModel, load_model


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


@pytest.mark.parametrize("norm,dual", [("linf", 1), ("l2", 2)])
def test_pgd_reaches_the_closed_form_minimal_perturbation_on_a_linear_model(norm, dual):
    model, w = linear_model()
    x = torch.randn(40, 30) * 0.2
    with torch.no_grad():
        labels = model(x).argmax(1)
        margin = model(x)[:, 1].abs()
    minimal = margin / w.norm(p=dual)
    below = pgd(model, x, labels, norm=norm, epsilons=[0.0], steps=1)  # sanity: no perturbation, no success
    assert not below.success.any()
    for point in range(0, 40, 8):
        result = pgd(model, x[point : point + 1], labels[point : point + 1], norm=norm, epsilons=[0.97 * minimal[point].item(), 1.03 * minimal[point].item()], steps=100, rel_stepsize=0.05)
        assert result.success[:, 0].tolist() == [False, True]
        assert result.norms[1, 0] <= 1.03 * minimal[point] + 1e-5


def test_restarts_only_add_successes_and_results_are_repeatable():
    model, _ = linear_model(seed=1)
    x = torch.randn(60, 30) * 0.2
    labels = model(x).argmax(1).detach()
    single = pgd(model, x, labels, norm="linf", epsilons=[0.01, 0.02], steps=5, seed=3)
    repeated = pgd(model, x, labels, norm="linf", epsilons=[0.01, 0.02], steps=5, seed=3)
    assert torch.equal(single.success, repeated.success)
    several = pgd(model, x, labels, norm="linf", epsilons=[0.01, 0.02], steps=5, seed=3, restarts=3)
    assert (several.success | ~single.success).all()
    assert (several.success.sum(1) >= single.success.sum(1)).all()
    assert single.robust_accuracy()[0] >= single.robust_accuracy()[1]
    assert several.options["restarts"] == 3 and several.options["steps"] == 5


def test_bad_options():
    model, _ = linear_model()
    x = torch.zeros(2, 30)
    with pytest.raises(ConfigError, match="unknown norm 'l1'"):
        pgd(model, x, torch.zeros(2, dtype=torch.long), norm="l1", epsilons=[0.1])
    with pytest.raises(ConfigError, match="restarts=0"):
        pgd(model, x, torch.zeros(2, dtype=torch.long), norm="linf", epsilons=[0.1], restarts=0)


def test_standard_mnist_model_is_not_robust_at_eps_03(mnist):
    images, labels = mnist.evaluation_subset(100)
    result = pgd(load_model("mnist-cnn-standard"), images, labels, norm="linf", epsilons=[0.3])
    assert result.robust_accuracy()[0] <= 0.05
    assert (result.norms <= 0.3 + 1e-6).all()
