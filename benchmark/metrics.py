"""A run's summary from its records: robust accuracy per attack, invariance metrics, the oracle's trust."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from invarbench.attacks import Budget
from invarbench.config import RunConfig
from invarbench.oracles import ABSTAIN
from invarbench.plan import Job
from invarbench.statistics import wilson_interval


def oracle_report(oracle, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The oracle on the unchanged evaluation points: how often it abstains, and how often it agrees
    with the data set's labels when it decides (the trust one can place in its invariance judgments)."""
    decided = oracle.label(images)
    judged = decided != ABSTAIN
    correct = int((decided[judged] == labels[judged]).sum())
    return {
        **oracle.describe(),
        "n": len(labels),
        "abstention_rate": 1 - int(judged.sum()) / len(labels),
        "accuracy_when_deciding": correct / int(judged.sum()) if judged.any() else None,
        "accuracy_when_deciding_ci95": wilson_interval(correct, int(judged.sum())),
    }


def invariance_metrics(rows: pd.DataFrame) -> dict[str, Any]:
    """Invariance accuracy and excessive-invariance rate over the candidates whose label the oracle
    says changed, with counts and 95% Wilson intervals."""
    rows = rows[rows["ran"]]
    judged = rows[rows["oracle_label"].notna()]
    changed = judged[judged["oracle_label"] != judged["label"]]
    agrees = int((changed["model_prediction"] == changed["oracle_label"]).sum())
    keeps = int((changed["model_prediction"] == changed["label"]).sum())
    logit_errors = rows["logit_error"].dropna()
    metrics = {
        "oracle": sorted(set(rows["oracle"].dropna())),
        "candidates": len(rows),
        "abstained": len(rows) - len(judged),
        "label_changed": len(changed),
        "label_changed_rate": len(changed) / len(judged) if len(judged) else 0.0,
        "model_agrees_with_oracle": agrees,
        "invariance_accuracy": agrees / len(changed) if len(changed) else None,
        "invariance_accuracy_ci95": wilson_interval(agrees, len(changed)),
        "model_keeps_original_label": keeps,
        "excessive_invariance_rate": keeps / len(changed) if len(changed) else None,
        "excessive_invariance_rate_ci95": wilson_interval(keeps, len(changed)),
        "median_perturbation_norm": float(rows["perturbation_norm"].median()) if len(rows) else None,
    }
    if len(logit_errors):
        metrics["max_logit_error"] = float(logit_errors.max())
    return metrics


def summarize(
    records: pd.DataFrame, config: RunConfig, models: dict[str, dict[str, Any]], invariance: pd.DataFrame | None = None
) -> dict[str, Any]:
    """Clean accuracy, cumulative robust accuracy after each perturbation attack (in cascade order),
    worst case; invariance metrics per invariance attack and eps."""
    perturbation = [(index, attack) for index, attack in enumerate(config.attacks) if attack.kind != "invariance"]
    summary: dict[str, Any] = {
        "n": config.n,
        "seed": config.seed,
        "cascade": config.cascade,
        "attack_order": [attack.label() for _, attack in perturbation],
        "models": {},
    }
    for model, info in models.items():
        model_records = records[records["model"] == model]
        clean_correct = info["clean_correct"]
        entry = {**info, "clean_accuracy": clean_correct / config.n, "threats": {}}
        for threat in config.threats if perturbation else ():
            per_eps = {}
            for eps in threat.epsilons:
                selected = model_records[(model_records["norm"] == threat.norm) & (model_records["eps"] == eps)]
                broken = set()
                attacks = {}
                for attack_index, attack in perturbation:
                    only = attack.only_epsilons
                    if only is not None and not any(abs(eps - wanted) < 1e-12 for wanted in only):
                        continue
                    rows = selected[selected["attack_index"] == attack_index]
                    newly = set(rows.loc[rows["success"].fillna(False).astype(bool), "index"].tolist())
                    attacked = int(rows["ran"].sum())
                    broken |= newly
                    robust = clean_correct - len(broken)
                    attacks[attack.label()] = {
                        "attacked": attacked,
                        "broken": len(newly),
                        "robust": robust,
                        "robust_accuracy": robust / config.n,
                        "attack_success_rate": len(newly) / attacked if attacked else 0.0,
                    }
                robust = clean_correct - len(broken)
                per_eps[f"{eps:g}"] = {
                    "attacks": attacks,
                    "worst_case": {"robust": robust, "robust_accuracy": robust / config.n},
                }
            entry["threats"][threat.norm] = per_eps
        if invariance is not None and len(invariance):
            model_rows = invariance[invariance["model"] == model]
            entry["invariance"] = {}
            for attack_index, attack in enumerate(config.attacks):
                rows = model_rows[model_rows["attack_index"] == attack_index]
                if len(rows):
                    entry["invariance"][attack.label()] = {
                        str(Budget(norm, eps)): invariance_metrics(group)
                        for (norm, eps), group in rows.groupby(["norm", "eps"], sort=True)
                    }
        summary["models"][model] = entry
    return summary


def _tally(tallies: dict[tuple, list[int]], job: Job, records: pd.DataFrame) -> str:
    """Add the job's outcome at its largest eps to the running tally of its attack; describe the tally."""
    rows = records[(records["eps"] == job.threat.epsilons[-1]) & records["ran"]]
    tally = tallies.setdefault((job.model, str(job.threat), job.attack_index), [0, 0])
    tally[0] += len(rows)
    tally[1] += int(rows["success"].sum())
    attacked, broken = tally
    return f"{1 - broken / attacked:.1%} of {attacked}" if attacked else "-"
