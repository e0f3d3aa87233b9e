"""The typed views of summaries and entries (invarbench.results)."""

import json
from pathlib import Path

import pytest

from invarbench.results import WORST_CASE, entry_results, invariance_frame, robustness_frame

ENTRIES = Path(__file__).parents[1] / "leaderboard" / "entries"


def test_robustness_frame_has_one_row_per_attack_and_the_worst_case():
    results = {
        "threats": {
            "linf": {
                "0.3": {
                    "attacks": {
                        "pgd": {
                            "attacked": 9,
                            "broken": 2,
                            "robust": 7,
                            "robust_accuracy": 0.7,
                            "attack_success_rate": 2 / 9,
                        },
                        "autoattack": {
                            "attacked": 7,
                            "broken": 1,
                            "robust": 6,
                            "robust_accuracy": 0.6,
                            "attack_success_rate": 1 / 7,
                        },
                    },
                    "worst_case": {"robust": 6, "robust_accuracy": 0.6},
                }
            }
        }
    }
    frame = robustness_frame([("m", results)])
    assert list(frame["attack"]) == ["pgd", "autoattack", WORST_CASE]
    assert list(frame["robust_accuracy"]) == [0.7, 0.6, 0.6]
    assert frame["eps"].tolist() == [0.3] * 3 and frame["setting"].tolist() == ["0.3"] * 3
    assert frame.loc[frame["attack"] == WORST_CASE, "attacked"].isna().all()


def test_frames_of_a_stored_entry_match_its_json():
    entry = json.loads((ENTRIES / "mnist-cnn-pgd-linf-0.3__mnist__perturbation.json").read_text())
    frame = robustness_frame(entry_results([entry]))
    for norm, per_eps in entry["results"]["threats"].items():
        for setting, outcome in per_eps.items():
            rows = frame[(frame["norm"] == norm) & (frame["setting"] == setting)]
            assert dict(zip(rows["attack"], rows["robust_accuracy"])) == {
                **{attack: figures["robust_accuracy"] for attack, figures in outcome["attacks"].items()},
                WORST_CASE: outcome["worst_case"]["robust_accuracy"],
            }
    invariance = json.loads((ENTRIES / "mnist-cnn-pgd-linf-0.3__mnist__invariance.json").read_text())
    frame = invariance_frame(entry_results([invariance]))
    assert len(frame) == sum(len(per_setting) for per_setting in invariance["results"]["invariance"].values())
    row = frame[(frame["attack"] == "invariance-l0")].iloc[0]
    assert (row["norm"], row["eps"]) == ("l0", 25.0)
    assert row["label_changed"] == invariance["results"]["invariance"]["invariance-l0"]["l0:25"]["label_changed"]


def test_empty_results_give_empty_frames_with_their_columns():
    assert robustness_frame([]).empty and "robust_accuracy" in robustness_frame([]).columns
    assert invariance_frame([("m", {})]).empty and "setting" in invariance_frame([]).columns


@pytest.mark.parametrize("setting", ["set:0", "set:labels"])
def test_pseudo_norm_budgets_that_are_not_numbers_keep_their_setting(setting):
    frame = invariance_frame([("m", {"invariance": {"fixed-set": {setting: {"candidates": 3}}}})])
    assert frame["setting"].item() == setting and frame["norm"].item() == "set"
