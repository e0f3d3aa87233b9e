"""``invariance-set``: a fixed set of changed images with people's labels."""

from __future__ import annotations

import torch

from invarbench.attacks.base import Budget, ThreatModel, register_attack
from invarbench.attacks.invariance.base import InvarianceAttack, InvarianceResult
from invarbench.errors import ConfigError
from invarbench.oracles import ABSTAIN, LabelFileOracle, load_invariance_sets


@register_attack
class InvarianceSetAttack(InvarianceAttack):
    """Evaluate on a fixed set of changed images with people's labels (``invarbench run --invariance-set
    DIR``): each set in DIR is one pseudo-eps (its position), each image the candidate of the test
    point it was made from, judged by that set's label-file oracle."""

    name = "invariance-set"
    norms = ("set",)
    needs_oracle = False

    def __init__(self, *, directory: str = ""):
        if not directory:
            raise ConfigError(
                "invariance-set needs directory=DIR (a folder of NAME.npy + NAME_labels.npy files); use"
                " --invariance-set DIR"
            )
        self.directory = str(directory)

    def sets(self):
        return load_invariance_sets(self.directory)

    def budgets(self, threat: ThreatModel, invertible: bool) -> tuple[Budget, ...]:
        # One budget per set (its position), once, whatever threats are configured.
        return tuple(Budget("set", position) for position in range(len(self.sets())))

    def run(self, model, images, labels, *, norm, epsilons, seed, context):
        sets = self.sets()
        indices = context.indices
        count = len(labels)
        candidates = images.unsqueeze(0).repeat(len(epsilons), *[1] * images.dim()).clone()
        ran = torch.zeros(len(epsilons), count, dtype=torch.bool)
        oracle_labels = torch.full((len(epsilons), count), ABSTAIN, dtype=torch.long)
        sources = torch.full((len(epsilons), count), -1, dtype=torch.long)
        names = []
        for eps_index, eps in enumerate(epsilons):
            item = sets[int(eps)]
            names.append(LabelFileOracle([item]).name)
            position = {int(index): row for row, index in enumerate(item.original_indices.tolist())}
            for point, index in enumerate(indices.tolist()):
                if index in position:
                    row = position[index]
                    candidates[eps_index, point] = item.images[row].view(images.shape[1:])
                    oracle_labels[eps_index, point] = int(item.labels[row])
                    sources[eps_index, point] = row
                    ran[eps_index, point] = True
        with torch.no_grad():
            predictions = torch.stack([model(candidates[e]).argmax(1).cpu() for e in range(len(epsilons))])
        norms = (candidates - images.unsqueeze(0)).flatten(2).abs().amax(2)
        targets = torch.where(ran & (oracle_labels != labels), oracle_labels, torch.full_like(oracle_labels, -1))
        return InvarianceResult(
            self.name,
            "set",
            epsilons,
            candidates,
            targets,
            sources,
            names[0] if names else "label-file",
            oracle_labels,
            predictions,
            norms,
            torch.full((len(epsilons), count), float("nan")),
            self.options(),
            ran=ran,
            oracles=tuple(names),
        )
