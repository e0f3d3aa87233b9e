"""Diagnostics behind the iCE card's notes: can label information be taken out of a fi-RevNet's nuisance?

Both experiments start from the committed ``mnist-firevnet-ce`` (its z = F(x) on the 50k training and
10k test images) and report the test error of a classifier trained afterwards on the transformed
nuisance (an MLP, 2 x 512 hidden units, 3 epochs; 90% error = no label information left).

    python docs/experiments/ice_diagnostics.py baseline           # z_n as it is
    python docs/experiments/ice_diagnostics.py class-residual     # z_n less its class mean, / class std
    python docs/experiments/ice_diagnostics.py head --adversary-weight 1.0 --epochs 6

``class-residual`` removes each class's mean and standard deviation (by the model's predicted class),
what one class-conditional affine layer on z_n could do. ``head`` keeps the network frozen (logits and
clean accuracy untouched) and trains a class-conditional flow on z_n (dense affine couplings conditioned
on softmax(z_s), so the whole map stays a bijection) by maximum likelihood, plus, with a weight, the
iCE adversary: a nuisance classifier trained on the head's output while the head pulls its prediction
to uniform. One CPU thread; a few minutes each.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from invarbench.datasets import load_dataset
from invarbench.measure import encode_all, readout_error
from invarbench.models.registry import load_model

CLASSES = 10


def encoded(model_name: str):
    model = load_model(model_name).eval()
    dataset = load_dataset("mnist")
    return (
        encode_all(model, dataset.train_images),
        encode_all(model, dataset.test_images),
        dataset.train_labels,
        dataset.test_labels,
    )


class ConditionalCoupling(torch.nn.Module):
    """Affine coupling on the nuisance: the second half is scaled and shifted by a function of the first
    half and the condition (softmax of the logits); starts at the identity."""

    def __init__(self, dimension: int, hidden: int = 512):
        super().__init__()
        self.half = dimension // 2
        self.net = torch.nn.Sequential(
            torch.nn.Linear(self.half + CLASSES, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 2 * (dimension - self.half)),
        )
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, condition):
        kept, changed = x[:, : self.half], x[:, self.half :]
        log_scale, shift = self.net(torch.cat([kept, condition], 1)).chunk(2, 1)
        log_scale = 2 * torch.tanh(log_scale / 2)
        return torch.cat([kept, changed * log_scale.exp() + shift], 1), log_scale.sum(1)


def head(train_z, test_z, train_labels, *, adversary_weight: float, epochs: int, blocks: int, seed: int = 0):
    mean, std = train_z[:, CLASSES:].mean(0), train_z[:, CLASSES:].std(0).clamp_min(1e-6)

    def split(z):
        return F.softmax(z[:, :CLASSES], 1), (z[:, CLASSES:] - mean) / std

    train_condition, train_nuisance = split(train_z)
    test_condition, test_nuisance = split(test_z)
    dimension = train_nuisance.shape[1]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    permutations = [torch.randperm(dimension, generator=generator) for _ in range(blocks)]
    layers = torch.nn.ModuleList(ConditionalCoupling(dimension) for _ in range(blocks))

    def flow(x, condition):
        log_det = torch.zeros(len(x))
        for permutation, layer in zip(permutations, layers):
            x, term = layer(x[:, permutation], condition)
            log_det = log_det + term
        return x, log_det

    adversary = torch.nn.Sequential(
        torch.nn.Linear(dimension, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, CLASSES),
    )
    optimizer = torch.optim.Adam(layers.parameters(), lr=1e-3)
    adversary_optimizer = torch.optim.Adam(adversary.parameters(), lr=1e-3)
    for epoch in range(epochs):
        order = torch.randperm(len(train_labels), generator=generator)
        accuracies = []
        for start in range(0, len(order), 256):
            index = order[start : start + 256]
            z, log_det = flow(train_nuisance[index], train_condition[index])
            negative_log_likelihood = (0.5 * z.pow(2).sum(1) - log_det).mean() / dimension
            scores = adversary(z.detach())
            adversary_loss = F.cross_entropy(scores, train_labels[index])
            adversary_optimizer.zero_grad()
            adversary_loss.backward()
            adversary_optimizer.step()
            accuracies.append(float((scores.argmax(1) == train_labels[index]).float().mean()))
            loss = negative_log_likelihood
            if adversary_weight:
                loss = loss + adversary_weight * -F.log_softmax(adversary(z), 1).mean(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(
            f"epoch {epoch + 1}: nll/dim {negative_log_likelihood.item():.3f}, adversary batch accuracy"
            f" {sum(accuracies) / len(accuracies):.3f}",
            flush=True,
        )
    with torch.no_grad():
        return (
            torch.cat(
                [
                    flow(train_nuisance[s : s + 1000], train_condition[s : s + 1000])[0]
                    for s in range(0, len(train_nuisance), 1000)
                ]
            ),
            torch.cat(
                [
                    flow(test_nuisance[s : s + 1000], test_condition[s : s + 1000])[0]
                    for s in range(0, len(test_nuisance), 1000)
                ]
            ),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=("baseline", "class-residual", "head"))
    parser.add_argument("--model", default="mnist-firevnet-ce")
    parser.add_argument("--adversary-weight", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    train_z, test_z, train_labels, test_labels = encoded(args.model)
    if args.experiment == "baseline":
        features = train_z[:, CLASSES:], test_z[:, CLASSES:]
    elif args.experiment == "class-residual":
        train_n, test_n = train_z[:, CLASSES:], test_z[:, CLASSES:]
        means = torch.stack([train_n[train_labels == c].mean(0) for c in range(CLASSES)])
        stds = torch.stack([train_n[train_labels == c].std(0) for c in range(CLASSES)]).clamp_min(1e-6)
        train_p, test_p = train_z[:, :CLASSES].argmax(1), test_z[:, :CLASSES].argmax(1)
        features = (train_n - means[train_p]) / stds[train_p], (test_n - means[test_p]) / stds[test_p]
    else:
        features = head(
            train_z,
            test_z,
            train_labels,
            adversary_weight=args.adversary_weight,
            epochs=args.epochs,
            blocks=args.blocks,
        )
    error = readout_error(*features, train_labels, test_labels, classes=CLASSES, epochs=3)
    print(json.dumps({**vars(args), "after_the_fact_error": round(error, 4), "seconds": round(time.time() - started)}))


if __name__ == "__main__":
    main()
