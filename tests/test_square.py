"""invarbench's Square (attacks/square.py): the closed form on a linear model, the ball and the bounds,
determinism, early exit, the traced forward pass, and agreement with pyautoattack's Square on a zoo model."""

import pytest
import torch

from invarbench.attacks import create_attack
from invarbench.attacks.square import p_selection, square_l2, square_linf, traced_forward
from invarbench.models import BenchmarkModel


def linear_two_class(count=40, seed=0):
    """Two classes on 1x8x8 images in [0.2, 0.8]: the margin of class 0 over class 1 is w.x + b, and the
    smallest l_inf perturbation that flips a point is |w.x + b| / ||w||_1 (the box does not bind below eps 0.2).
    The points lie at distances spread over (0, 0.2) from the boundary."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(64, generator=generator)
    layer = torch.nn.Linear(64, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.stack([w / 2, -w / 2]))
        layer.bias.copy_(torch.stack([-w.sum() / 4, w.sum() / 4]))
        offsets = torch.linspace(-1.3, 1.3, count).view(-1, 1)
        noise = 0.1 * torch.rand(count, 64, generator=generator) - 0.05
        x = (0.5 + 0.15 * offsets * w.sign() + noise).clamp(0.2, 0.8).view(count, 1, 8, 8)
    model = BenchmarkModel(torch.nn.Sequential(torch.nn.Flatten(), layer), bounds=(0.0, 1.0), num_classes=2).eval()
    with torch.no_grad():
        output = model(x)
    labels = output.argmax(1)
    distance = (output[:, 0] - output[:, 1]).abs() / w.abs().sum()
    return model, x, labels, distance


def small_cnn(bounds=(0.0, 1.0), seed=0):
    torch.manual_seed(seed)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 10),
    )
    return BenchmarkModel(network, bounds=bounds, num_classes=10).eval()


def test_p_selection_follows_the_papers_schedule():
    assert [p_selection(query, p_init=0.8, queries=5000) for query in (0, 10, 11, 50, 51, 4000, 4001, 8001)] == [
        0.8,
        0.8,
        0.4,
        0.4,
        0.2,
        0.8 / 64,
        0.8 / 128,
        0.8 / 512,
    ]
    # Rescaled: the 10000-query schedule stretched over the budget.
    assert p_selection(500, p_init=0.8, queries=1000, rescale_schedule=True) == 0.8 / 128


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_meets_the_closed_form_on_a_linear_model(norm):
    model, x, labels, distance = linear_two_class()
    if norm == "l2":
        # The l_2 distance to the boundary: |w.x + b| / ||w||_2.
        w = model.network[1].weight[0] - model.network[1].weight[1]
        distance = distance * w.abs().sum() / w.norm()
    eps = {"linf": 0.1, "l2": 0.5}[norm]
    result = create_attack("square", queries=1000, rescale_schedule=True)(model, x, labels, norm=norm, epsilons=(eps,))
    success = result.success[0]
    # No attack in the ball breaks a point farther than eps from the boundary...
    assert not success[distance > eps].any()
    # ... and Square gets close enough to the optimum (l_inf: the corner -eps * sign(w); l_2: -eps * w / ||w||_2,
    # which its square patterns approach less closely) to break those inside it. Measured: l_inf broke every
    # point up to 0.94 eps, l_2 every point up to 0.70 eps.
    near = distance < {"linf": 0.9, "l2": 0.6}[norm] * eps
    assert near.sum() >= 8 and success[near].all(), (distance[near & ~success], eps)
    assert (result.norms[0] <= eps * (1 + 1e-6)).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_stays_in_the_ball_and_the_bounds(norm):
    for bounds in ((0.0, 1.0), (-1.0, 1.0)):
        model = small_cnn(bounds)
        generator = torch.Generator().manual_seed(1)
        low, high = bounds
        x = (low + (high - low) * torch.rand(30, 1, 8, 8, generator=generator)).clamp(low + 0.1, high - 0.1)
        x[:, :, :2] = low  # rows at the bounds, where the ball is cut by them
        x[:, :, -2:] = high
        labels = model(x).argmax(1)
        eps = (high - low) * {"linf": 0.25, "l2": 2.0}[norm]
        result = create_attack("square", queries=200)(model, x, labels, norm=norm, epsilons=(eps,))
        adversarials = result.adversarials[0]
        assert (adversarials >= low).all() and (adversarials <= high).all(), bounds
        sizes = (
            (adversarials - x).flatten(1).abs().amax(1) if norm == "linf" else (adversarials - x).flatten(1).norm(dim=1)
        )
        assert (sizes <= eps * (1 + 1e-6)).all() and torch.equal(sizes, result.norms[0]), bounds
        assert result.success.any() and torch.equal(result.adversarial_predictions[0] != labels, result.success[0])
        assert result.options["forward"].startswith("traced")


@pytest.mark.parametrize("norm,epsilons", [("linf", (0.05, 0.1)), ("l2", (0.3, 0.6))])
def test_square_is_deterministic_for_a_seed(norm, epsilons):
    model = small_cnn()
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = model(x).argmax(1)
    attack = create_attack("square", queries=100)
    torch.manual_seed(7)
    first = attack(model, x, labels, norm=norm, epsilons=epsilons, seed=3)
    after = torch.rand(2)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(2)), "the attack must not move torch's global generator"
    second = attack(model, x, labels, norm=norm, epsilons=epsilons, seed=3)
    for name in ("success", "norms", "adversarial_predictions", "adversarials", "margins"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    other = attack(model, x, labels, norm=norm, epsilons=epsilons, seed=4)
    assert not torch.equal(first.adversarials, other.adversarials)


@pytest.mark.parametrize("search,eps", [(square_linf, 0.1), (square_l2, 0.5)])
def test_broken_points_stop_being_queried(search, eps):
    model = small_cnn()
    x = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = model(x).argmax(1)
    rows = []

    def forward(batch):
        rows.append(len(batch))
        return model(batch)

    queries = 150
    best, margin, used = search(
        forward, x, labels, eps=eps, queries=queries, generator=torch.Generator().manual_seed(0)
    )
    broken = margin <= 0
    assert 0 < broken.sum() < len(x)
    assert sum(rows) == int(used.sum()), "each point is queried only while it is robust"
    assert (used[~broken] == queries + 1).all() and (used[broken] < queries + 1).all()
    assert rows == sorted(rows, reverse=True) and rows[0] == len(x)
    with torch.no_grad():
        assert torch.equal(model(best).argmax(1) != labels, broken)
    # A point's search does not depend on when the others left it: with the broken points given a label
    # they are misclassified as from the start (so never queried), the others end at the same examples.
    robust = (~broken).nonzero().flatten()
    with torch.no_grad():
        unlikely = model(x).argmin(1)
    again, again_margin, again_used = search(
        model,
        x,
        torch.where(broken, unlikely, labels),
        eps=eps,
        queries=queries,
        generator=torch.Generator().manual_seed(0),
    )
    assert (again_used[broken] == 1).all() and (again_margin[broken] < 0).all()
    assert torch.equal(again[robust], best[robust])


def test_traced_forward_falls_back_where_tracing_changes_the_model():
    class BatchBaked(torch.nn.Module):
        """Reshapes with len(x): a trace records that batch size as a constant."""

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(64, 3)

        def forward(self, x):
            return self.layer(x.reshape(len(x), 64))

    model = BenchmarkModel(BatchBaked(), bounds=(0.0, 1.0), num_classes=3).eval()
    x = torch.rand(10, 1, 8, 8)
    forward, how = traced_forward(model, x)
    assert forward is model and how.startswith("eager")
    cnn = small_cnn()
    forward, how = traced_forward(cnn, x)
    assert how.startswith("traced")
    with torch.no_grad():
        assert torch.allclose(forward(x[:3]), cnn(x[:3]), atol=1e-5)


@pytest.mark.mnist
@pytest.mark.parametrize("norm,eps,queries", [("linf", 0.3, 200), ("l2", 3.0, 300)])
def test_square_agrees_with_pyautoattacks_on_a_zoo_model(mnist, norm, eps, queries):
    from pyautoattack.square import SquareAttack

    from invarbench.attacks.autoattack import UnitBox
    from invarbench.models import load_model

    images, labels = mnist.evaluation_subset(40)
    model = load_model("mnist-cnn-pgd-linf-0.1")
    # Above the model's training eps and a short budget, so that Square breaks some points and not others
    # (measured, robust accuracy with invarbench's and pyautoattack's: l_inf 0.700 and 0.775, l_2 0.425 and 0.450).
    ours = create_attack("square", queries=queries)(model, images, labels, norm=norm, epsilons=(eps,))
    square = SquareAttack(
        UnitBox(model, tuple(images.shape[1:])),
        p_init=0.8,
        n_queries=queries,
        eps=eps,
        norm={"linf": "Linf", "l2": "L2"}[norm],
        n_restarts=1,
        seed=0,
        device=torch.device("cpu"),
        resc_schedule=False,
    )
    with torch.no_grad():
        reference = model(square.perturb(images, labels)).argmax(1) != labels
    ours_accuracy, reference_accuracy = 1 - ours.success[0].float().mean().item(), 1 - reference.float().mean().item()
    assert 0.1 < reference_accuracy < 0.9, "a setting where Square breaks some points and not others"
    # Within 4 of the 40 points, and never weaker beyond 2 points (each point draws its own windows here).
    assert abs(ours_accuracy - reference_accuracy) <= 0.1 and ours_accuracy <= reference_accuracy + 0.05, (
        ours_accuracy,
        reference_accuracy,
    )
    assert ours.options["forward"].startswith("traced")
