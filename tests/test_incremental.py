"""The incremental forward pass for Square's small windows (attacks/incremental.py): the model's logits on
proposals of one and two windows, after accepted and rejected proposals, on the zoo architecture and on
other layer shapes; the networks it must refuse; and Square's results with it and without it."""

import pytest
import torch
from torch import nn

from invarbench.attacks import create_attack
from invarbench.attacks.incremental import IncrementalForward, split_network
from invarbench.attacks.square import square_linf
from invarbench.models import BenchmarkModel
from invarbench.models.architectures import MnistCNN


def windows_at(examples, corners, side, generator):
    """``examples`` with noise in ``side`` x ``side`` windows at ``corners``."""
    proposal = examples.clone()
    for rows, columns in corners:
        for point, (row, column) in enumerate(zip(rows.tolist(), columns.tolist())):
            proposal[point, :, row : row + side, column : column + side] = torch.rand(
                proposal.shape[1], side, side, generator=generator
            )
    return proposal


def corners_for(count, side, size, windows, generator, *, borders=True):
    """Random corners, the first points' at the four corners of the image (the windows cut by its borders)."""
    corners = []
    for _ in range(windows):
        rows, columns = (
            torch.randint(0, size - side + 1, (count,), generator=generator),
            torch.randint(0, size - side + 1, (count,), generator=generator),
        )
        if borders:
            rows[:4], columns[:4] = (
                torch.tensor([0, 0, size - side, size - side]),
                torch.tensor([0, size - side, 0, size - side]),
            )
        corners.append((rows, columns))
    return corners


def zoo_like(seed=0):
    torch.manual_seed(seed)
    return BenchmarkModel(MnistCNN(), bounds=(0.0, 1.0), num_classes=10, mean=(0.1307,), std=(0.3081,)).eval()


def other_layers(seed=0):
    """Unpadded and padded convolutions of other kernel sizes, batch norm, average pooling with overlapping
    windows, a leaky ReLU, three channels, and a head of more than one layer."""
    torch.manual_seed(seed)
    network = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(3, stride=2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )
    with torch.no_grad():
        network[1].running_mean.uniform_(-0.5, 0.5)
        network[1].running_var.uniform_(0.5, 2.0)
    return BenchmarkModel(network, bounds=(-1.0, 1.0), num_classes=5, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7)).eval()


@pytest.mark.parametrize(
    "make,shape,to_model", [(zoo_like, (1, 28, 28), None), (other_layers, (3, 16, 16), lambda unit: -1 + 2 * unit)]
)
@pytest.mark.parametrize("windows", [1, 2])
def test_incremental_logits_are_the_models_after_accepted_and_rejected_proposals(make, shape, to_model, windows):
    model = make()
    generator = torch.Generator().manual_seed(1)
    current = torch.rand(12, *shape, generator=generator)
    to_model = to_model or (lambda x: x)
    forward, how = IncrementalForward.build(model, current, to_model=to_model)
    assert forward is not None, how
    with torch.no_grad():
        assert torch.allclose(forward.reset(current), model(to_model(current)), atol=1e-5)
        for side in (1, 2, 3, 5, 8, shape[1]):
            # Some points only: the others keep their examples.
            points = torch.arange(0, 12, 2) if side % 2 else torch.arange(12)
            corners = corners_for(len(points), side, shape[1], windows, generator)
            proposal = windows_at(current[points], corners, side, generator)
            logits = forward.propose(proposal, points, corners, side)
            assert torch.allclose(logits, model(to_model(proposal)), atol=1e-4), (side, windows)
            accepted = torch.rand(len(points), generator=generator) < 0.5
            forward.commit(accepted)
            current[points[accepted]] = proposal[accepted]
        # What the maps hold is the examples accepted, and only those.
        points = torch.arange(12)
        corners = corners_for(12, 2, shape[1], windows, generator)
        proposal = windows_at(current, corners, 2, generator)
        assert torch.allclose(forward.propose(proposal, points, corners, 2), model(to_model(proposal)), atol=1e-4)


def test_networks_it_cannot_read_are_refused():
    x = torch.rand(4, 1, 8, 8)
    mlp = BenchmarkModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), bounds=(0.0, 1.0), num_classes=3).eval()
    strided = BenchmarkModel(
        nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.Flatten(), nn.Linear(18, 3)), bounds=(0.0, 1.0), num_classes=3
    ).eval()
    assert split_network(mlp.network) is None and split_network(strided.network) is None
    for model in (mlp, strided):
        forward, how = IncrementalForward.build(model, x)
        assert forward is None and how.startswith("not incremental")

    class Skip(nn.Module):
        """``features`` and ``classifier``, but the forward pass also adds the input: not classifier(features(x))."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128, 3))

        def forward(self, x):
            return self.classifier(self.features(x) + x)

    forward, how = IncrementalForward.build(BenchmarkModel(Skip(), bounds=(0.0, 1.0), num_classes=3).eval(), x)
    assert forward is None and "differ" in how
    training = zoo_like().train()
    assert IncrementalForward.build(training, torch.rand(4, 1, 28, 28))[0] is None


@pytest.mark.mnist
def test_square_finds_the_same_with_and_without_the_incremental_forward_pass(mnist):
    """Both paths compute the same logits up to float rounding, so Square's search takes the same steps
    (a proposal whose margin ties the best one within rounding could in principle go either way)."""
    from invarbench.models import load_model

    model = load_model("mnist-cnn-standard")
    x, labels = mnist.evaluation_subset(30)
    incremental, how = IncrementalForward.build(model, x)
    assert incremental is not None, how
    # Rescaled to 400 queries, the windows shrink to 2 pixels within the budget: most queries are incremental.
    calls, propose = [], incremental.propose
    incremental.propose = lambda *arguments: calls.append(len(arguments[1])) or propose(*arguments)
    with torch.no_grad():
        runs = [
            square_linf(
                model,
                x,
                labels,
                eps=0.1,
                queries=400,
                generator=torch.Generator().manual_seed(0),
                rescale_schedule=True,
                incremental=use,
            )
            for use in (incremental, None)
        ]
    (best, margin, used), (reference_best, reference_margin, reference_used) = runs
    assert torch.equal(used, reference_used) and torch.equal(best, reference_best)
    assert len(calls) >= 300 and sum(calls) >= int(used.sum()) // 2, (
        "queries of windows up to 1/12 of the image went through it"
    )
    assert torch.allclose(margin, reference_margin, atol=1e-4)
    assert 5 <= (margin <= 0).sum() <= len(x) - 5, "a setting where Square breaks some points and not others"
    result = create_attack("square", queries=50)(model, x, labels, norm="linf", epsilons=(0.1,))
    assert result.options["forward"].endswith("incremental for small windows")
