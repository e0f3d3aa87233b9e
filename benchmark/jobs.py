"""A job (one attack on one shard of one model under one threat model) and its execution: the attack's
outcome as per-sample records."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from invarbench.attacks import ThreatModel
from invarbench.attacks.invariance import InvarianceContext
from invarbench.config import AttackSpec
from invarbench.evaluation import logits, top_margins
from invarbench.oracles import ABSTAIN
from invarbench.store import INVARIANCE_COLUMNS, RECORD_COLUMNS, as_records


@dataclass(frozen=True)
class Job:
    model: str
    threat: ThreatModel
    attack_index: int
    attack: AttackSpec
    shard: int
    start: int
    stop: int
    seed: int

    @property
    def id(self) -> str:
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model)
        return f"{model}__{self.threat.norm}__{self.attack_index:02d}-{self.attack.name}__shard{self.shard:05d}"


@dataclass
class JobTask:
    """A job with everything it needs but the model and the shared inputs of its model (``ModelInputs``)."""

    job: Job
    images: torch.Tensor
    labels: torch.Tensor
    clean_predictions: torch.Tensor
    cascade: bool
    #: Ids of the jobs whose records this job reads, in plan order (the earlier attacks of its shard and norm).
    after: tuple[str, ...] = ()


@dataclass
class JobOutput:
    records: pd.DataFrame
    seconds: float
    warnings: tuple[str, ...] = ()
    #: An invariance job's candidate images.
    candidates: Any = None


def _point_columns(
    job: Job, labels: torch.Tensor, clean_predictions: torch.Tensor, norm: str, eps: float
) -> dict[str, Any]:
    """The columns every record starts with: which model, point, threat and attack it belongs to."""
    return {
        "model": job.model,
        "index": torch.arange(job.start, job.stop).numpy(),
        "label": labels.numpy(),
        "clean_prediction": clean_predictions.numpy(),
        "norm": norm,
        "eps": eps,
        "attack": job.attack.name,
        "attack_index": job.attack_index,
    }


def execute_job(
    job: Job,
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    clean_predictions: torch.Tensor,
    earlier: pd.DataFrame | None,
    *,
    cascade: bool,
    workspace: Path | None = None,
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Run one job on its shard; return its per-sample records (one row per point and eps) and the
    reliability warnings its attack raised.

    ``images``, ``labels`` and ``clean_predictions`` are the shard's; ``earlier`` holds the records of
    the cheaper attacks on the same shard and threat model (used by the cascade).
    """
    epsilons = job.threat.epsilons
    count = len(labels)
    active = (clean_predictions == labels).unsqueeze(0).repeat(len(epsilons), 1)
    if cascade and job.attack.cascades and earlier is not None and len(earlier):
        broken = earlier[earlier["success"].fillna(False).astype(bool)]
        for eps_index, eps in enumerate(epsilons):
            positions = broken.loc[broken["eps"] == eps, "index"].to_numpy() - job.start
            active[eps_index, torch.as_tensor(positions, dtype=torch.long)] = False
    success = torch.zeros(len(epsilons), count, dtype=torch.bool)
    norms = torch.full((len(epsilons), count), float("nan"))
    margins = torch.full((len(epsilons), count), float("nan"))
    predictions = torch.full((len(epsilons), count), -1, dtype=torch.long)
    points = active.any(dim=0).nonzero().flatten()
    warnings: tuple[str, ...] = ()
    if len(points):
        attack = job.attack.create()
        result = attack(
            model,
            images[points],
            labels[points],
            norm=job.threat.norm,
            epsilons=epsilons,
            seed=job.seed,
            active=active[:, points],
            workspace=workspace,
        )
        success[:, points], norms[:, points], predictions[:, points] = (
            result.success,
            result.norms,
            result.adversarial_predictions,
        )
        if result.margins is not None:
            margins[:, points] = result.margins.float()
        warnings = result.warnings
    rows = []
    for eps_index, eps in enumerate(epsilons):
        ran = active[eps_index]
        rows.append(
            pd.DataFrame(
                {
                    **_point_columns(job, labels, clean_predictions, job.threat.norm, eps),
                    "ran": ran.numpy(),
                    "success": pd.arrays.BooleanArray(success[eps_index].numpy(), ~ran.numpy()),
                    "adversarial_prediction": pd.arrays.IntegerArray(predictions[eps_index].numpy(), ~ran.numpy()),
                    "perturbation_norm": torch.where(ran, norms[eps_index], torch.tensor(float("nan"))).numpy(),
                    "logit_margin": torch.where(ran, margins[eps_index], torch.tensor(float("nan"))).numpy(),
                }
            )
        )
    return as_records(pd.concat(rows, ignore_index=True), RECORD_COLUMNS), warnings


def execute_invariance_job(
    job: Job,
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    clean_predictions: torch.Tensor,
    context: InvarianceContext,
) -> tuple[pd.DataFrame, torch.Tensor]:
    """Run one invariance job on its shard: per-candidate records and the candidate images."""
    result = job.attack.create()(
        model, images, labels, norm=job.threat.norm, epsilons=job.threat.epsilons, seed=job.seed, context=context
    )
    model_margins, oracle_margins = decision_margins(model, result)
    rows = []
    for eps_index, eps in enumerate(result.epsilons):
        oracle_labels = result.oracle_labels[eps_index].numpy()
        rows.append(
            pd.DataFrame(
                {
                    **_point_columns(job, labels, clean_predictions, result.norm, eps),
                    "ran": True if result.ran is None else result.ran[eps_index].numpy(),
                    "target_class": pd.arrays.IntegerArray(
                        result.target_classes[eps_index].numpy(), result.target_classes[eps_index].numpy() < 0
                    ),
                    "source_index": pd.arrays.IntegerArray(
                        result.source_indices[eps_index].numpy(), result.source_indices[eps_index].numpy() < 0
                    ),
                    "oracle": result.oracle if result.oracles is None else result.oracles[eps_index],
                    "oracle_label": pd.arrays.IntegerArray(oracle_labels, oracle_labels == ABSTAIN),
                    "model_prediction": pd.arrays.IntegerArray(
                        result.model_predictions[eps_index].numpy(), result.model_predictions[eps_index].numpy() < 0
                    ),
                    "perturbation_norm": result.perturbation_norms[eps_index].numpy(),
                    "logit_error": result.logit_errors[eps_index].numpy(),
                    "model_margin": model_margins[eps_index].numpy(),
                    "oracle_margin": pd.arrays.IntegerArray(
                        oracle_margins[eps_index].numpy(), oracle_margins[eps_index].numpy() < 0
                    ),
                }
            )
        )
    return as_records(pd.concat(rows, ignore_index=True), INVARIANCE_COLUMNS), result.candidates


def decision_margins(model: torch.nn.Module, result) -> tuple[torch.Tensor, torch.Tensor]:
    """How firmly each candidate's outcome was decided (see ``InvarianceResult.model_margins``): as the
    attack judged it, or for an attack that did not judge (fixed sets), the model's margins measured
    here and no oracle margin."""
    if result.model_margins is not None:
        return result.model_margins, result.oracle_margins
    shape = result.candidates.shape[:2]
    flat = result.candidates.flatten(0, 1)
    model_margins = top_margins(logits(model, flat)).view(shape) if len(flat) else torch.zeros(shape)
    return model_margins, torch.full(shape, -1, dtype=torch.long)
