"""The attack taxonomy: fixed-eps, minimum-norm and invariance attacks as classes, invariance budgets, and
what a call needs passed as call arguments."""

import json
from pathlib import Path

import pytest
import torch

from invarbench.attacks import (
    ATTACKS,
    Attack,
    BaseAttack,
    Budget,
    InvarianceAttack,
    InvarianceContext,
    MinimumNormAttack,
    ThreatModel,
    create_attack,
)
from invarbench.errors import ConfigError
from invarbench.models import BenchmarkModel
from invarbench.oracles import ExactOracle

ENTRIES = Path(__file__).parents[1] / "leaderboard" / "entries"


def test_registered_attacks_are_classified_by_their_class():
    assert {name for name, cls in ATTACKS.items() if issubclass(cls, MinimumNormAttack)} == {"fmn"}
    assert {name for name, cls in ATTACKS.items() if issubclass(cls, InvarianceAttack)} == {
        "invariance-linf",
        "invariance-l0",
        "invariance-l0-judge-guided",
        "metameric",
        "invariance-set",
    }
    for name, cls in ATTACKS.items():
        assert issubclass(cls, BaseAttack) and issubclass(cls, Attack) != issubclass(cls, InvarianceAttack)
        # The track follows the class: perturbation attacks and invariance attacks are siblings.
        assert cls.track == ("invariance" if issubclass(cls, InvarianceAttack) else "perturbation"), name


def test_a_minimum_norm_attack_must_give_minimal_norms():
    class Incomplete(MinimumNormAttack):
        name = "incomplete"

        def run(self, model, images, labels, *, norm, epsilons, seed, active, workspace=None):
            raise NotImplementedError

    with pytest.raises(TypeError, match="minimal_norms"):
        Incomplete()


@pytest.mark.parametrize("text", ["linf:0.3", "l2:2", "l0:25", "metamer:0", "set:0", "set:3", "linf:0.0313725"])
def test_budget_text_round_trips(text):
    budget = Budget.parse(text)
    assert str(budget) == text and Budget.parse(str(budget)) == budget


def test_budgets_format_as_the_stored_settings_and_parse_back():
    assert str(Budget("l0", 25)) == "l0:25" and Budget("l0", 25).value == 25.0
    assert str(Budget("linf", 0.4)) == "linf:0.4" and str(Budget("metamer", 0.0)) == "metamer:0"
    stored = [
        setting
        for path in sorted(ENTRIES.glob("*__invariance.json"))
        for per_setting in json.loads(path.read_text())["results"]["invariance"].values()
        for setting in per_setting
    ]
    assert {"l0:25", "linf:0.3", "metamer:0"} <= set(stored)
    assert all(str(Budget.parse(setting)) == setting for setting in stored)


@pytest.mark.parametrize(
    "text,message",
    [
        ("l025", "has no norm; write NORM:VALUE"),
        ("l1:3", "unknown norm 'l1'; use one of linf, l2, l0, metamer, set"),
        ("linff:0.3", "Did you mean linf"),
        ("l0:many", "the value 'many' is not a number"),
        ("linf:nan", "is not a number"),
        ("l0:2.5", "l0 counts changed pixels, a whole number from 1"),
        ("l0:0", "a whole number from 1"),
        ("metamer:1", "exact metamers have no budget; write metamer:0"),
        ("set:-1", "the position of a fixed invariance set, a whole number from 0"),
        ("linf:0", "eps must be a positive number, e.g. linf:0.3"),
    ],
)
def test_bad_budgets_are_refused_naming_the_fix(text, message):
    with pytest.raises(ConfigError, match=message):
        Budget.parse(text)


def test_lenient_parsing_keeps_settings_that_are_not_numbers():
    budget = Budget.parse("set:labels", lenient=True)
    assert budget.norm == "set" and budget.value != budget.value


def test_invariance_attacks_give_their_budgets_per_threat():
    linf, l2 = ThreatModel("linf", (0.3, 0.4)), ThreatModel("l2", (2.0,))
    assert create_attack("invariance-linf").budgets(linf, False) == (Budget("linf", 0.3), Budget("linf", 0.4))
    assert create_attack("invariance-linf").budgets(l2, False) == ()
    assert create_attack("invariance-l0", pixels=12).budgets(l2, False) == (Budget("l0", 12),)
    assert create_attack("metameric").budgets(linf, True) == (Budget("metamer", 0),)
    assert create_attack("metameric").budgets(l2, True) == ()
    assert create_attack("metameric").budgets(l2, False) == (Budget("l2", 2.0),)


def test_an_invariance_attack_called_without_context_names_the_fix():
    model = BenchmarkModel(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)), bounds=(0, 1), num_classes=3
    )
    images, labels = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    attack = create_attack("metameric", steps=2)
    with pytest.raises(
        ConfigError,
        match=r"'metameric' needs context=InvarianceContext\(dataset, oracle, indices\).*pass it in the call",
    ):
        attack(model, images, labels, norm="linf", epsilons=(0.1,))
    oracle = ExactOracle("exact:test", lambda x: torch.zeros(len(x), dtype=torch.long))
    result = attack(
        model, images, labels, norm="linf", epsilons=(0.1,), context=InvarianceContext(None, oracle, torch.arange(4))
    )
    assert result.oracle == "exact:test" and not hasattr(attack, "context"), (
        "the context is an argument of the call, not state of the attack"
    )
