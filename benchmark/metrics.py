"""Figures from records: robust accuracy per attack, invariance metrics, minimum-norm curves, the oracle's trust."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from invarbench.attacks import ATTACKS, Budget, MinimumNormAttack
from invarbench.config import AttackSpec, RunConfig
from invarbench.jobs import Job
from invarbench.oracles import ABSTAIN
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


def robustness_section(
    records: pd.DataFrame, config: RunConfig, attacks: list[tuple[int, AttackSpec]], clean_correct: int
) -> dict[str, Any]:
    """One model's robust accuracy per norm and eps (the summary's ``threats``): after each perturbation
    attack ``attacks`` lists (run position, spec), cumulative in cascade order, and in the worst case."""
    threats: dict[str, Any] = {}
    for threat in config.threats if attacks else ():
        per_eps = {}
        for eps in threat.epsilons:
            selected = records[(records["norm"] == threat.norm) & (records["eps"] == eps)]
            broken: set[int] = set()
            figures = {}
            for attack_index, attack in attacks:
                only = attack.only_epsilons
                if only is not None and not any(abs(eps - wanted) < 1e-12 for wanted in only):
                    continue
                rows = selected[selected["attack_index"] == attack_index]
                newly = set(rows.loc[rows["success"].fillna(False).astype(bool), "index"].tolist())
                attacked = int(rows["ran"].sum())
                broken |= newly
                robust = clean_correct - len(broken)
                figures[attack.label()] = {
                    "attacked": attacked,
                    "broken": len(newly),
                    "robust": robust,
                    "robust_accuracy": robust / config.n,
                    "attack_success_rate": len(newly) / attacked if attacked else 0.0,
                }
            robust = clean_correct - len(broken)
            per_eps[f"{eps:g}"] = {
                "attacks": figures,
                "worst_case": {"robust": robust, "robust_accuracy": robust / config.n},
            }
        threats[threat.norm] = per_eps
    return threats


def invariance_section(records: pd.DataFrame, config: RunConfig) -> dict[str, Any]:
    """One model's invariance metrics (the summary's ``invariance``) per invariance attack and setting."""
    section = {}
    for attack_index, attack in enumerate(config.attacks):
        rows = records[records["attack_index"] == attack_index]
        if len(rows):
            section[attack.label()] = {
                str(Budget(norm, eps)): invariance_metrics(group)
                for (norm, eps), group in rows.groupby(["norm", "eps"], sort=True)
            }
    return section


def tally(tallies: dict[tuple, list[int]], job: Job, records: pd.DataFrame) -> str:
    """Add the job's outcome at its largest eps to the running tally of its attack; describe the tally."""
    rows = records[(records["eps"] == job.threat.epsilons[-1]) & records["ran"]]
    tally = tallies.setdefault((job.model, str(job.threat), job.attack_index), [0, 0])
    tally[0] += len(rows)
    tally[1] += int(rows["success"].sum())
    attacked, broken = tally
    return f"{1 - broken / attacked:.1%} of {attacked}" if attacked else "-"


def minimum_norm_curves(records: pd.DataFrame, attacks: list[dict[str, Any]], n: int) -> dict[str, dict[str, Any]]:
    """Per norm, the smallest adversarial norm a minimum-norm attack (a ``MinimumNormAttack``, e.g.
    FMN) found for every point it ran on, sorted: the whole robust-accuracy-versus-eps curve, since a
    point counts as robust at eps when its smallest norm is larger (see :func:`curve_robust_accuracy`).
    The first such attack of the cascade per norm is kept; +inf (none found) is stored as a count."""
    curves: dict[str, dict[str, Any]] = {}
    for position, attack in enumerate(attacks):
        if not issubclass(ATTACKS[attack["name"]], MinimumNormAttack):
            continue
        rows = records[
            (records["attack"] == attack["name"]) & (records["attack_index"] == position) & records["ran"].astype(bool)
        ]
        for norm, per_norm in rows.groupby("norm", sort=True):
            if norm in curves:
                continue
            # The same minimal norm is recorded once per eps; one eps's rows hold every point the attack ran on.
            first = per_norm[per_norm["eps"] == per_norm["eps"].min()].sort_values("index")
            norms = first["perturbation_norm"].to_numpy(dtype=float)
            finite = sorted(float(f"{value:.6g}") for value in norms if value == value and value != float("inf"))
            curves[str(norm)] = {
                "attack": attack["name"],
                "options": attack.get("options", {}),
                "n": n,
                "attacked": len(first),
                "not_found": int(len(norms) - len(finite)),
                "minimal_norms": finite,
            }
    return curves
