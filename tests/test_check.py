"""The regression check: exact where an outcome was decided with margin, tolerant only where it was not,
and failing on real regressions (a changed weight, a changed oracle member, an attack option changed
behind the entry's back)."""

import json
import shutil

import pandas as pd
import pytest
import tomli_w
import torch

from invarbench.attacks import ThreatModel, foolbox_attacks
from invarbench.cli import main
from invarbench.config import AttackSpec, ModelSpec, RunConfig
from invarbench.io import sha256_file
from invarbench.leaderboard.check import AGGREGATE_TOLERANCE, LOGIT_TOLERANCE, check_entries
from invarbench.leaderboard.entries import add_run
from invarbench.models import get_card, registry
from invarbench.runner import run_benchmark

STEM = "spheres-mlp-pgd-linf__spheres__perturbation"


@pytest.fixture
def spheres_entries(tmp_path, isolated_registry):
    """A perturbation entry of a spheres model (PGD at two eps, 40 points) in an isolated registry."""
    isolated_registry("spheres-mlp-pgd-linf")
    config = RunConfig(
        (ModelSpec("spheres-mlp-pgd-linf", "spheres"),),
        (ThreatModel("linf", (0.02, 0.05)),),
        (AttackSpec("pgd", (("steps", 10),)),),
        n=40,
        shard_size=20,
    )
    run_benchmark(config, tmp_path / "runs", name="run", progress=False)
    entries = tmp_path / "entries"
    add_run(tmp_path / "runs" / "run", entries)
    return entries


def _records(entries):
    path = entries / f"{STEM}.parquet"
    return path, pd.read_parquet(path)


def test_entries_record_the_margin_that_decided_each_outcome_and_the_machine(spheres_entries):
    _, records = _records(spheres_entries)
    ran = records[records["ran"]]
    assert ran["logit_margin"].notna().all()
    assert ((ran["logit_margin"] < 0) == ran["success"].astype(bool)).all()
    entry = json.loads((spheres_entries / f"{STEM}.json").read_text())
    assert entry["machine"]["threads"] == torch.get_num_threads() and "(" in entry["machine"]["cpu"]
    [result] = check_entries(spheres_entries, names=[STEM])
    assert result.passed and not result.borderline and not result.warnings


def test_a_flip_is_allowed_only_within_the_margin_and_counted_apart(spheres_entries, capsys):
    path, records = _records(spheres_entries)
    broken = records.index[records["ran"] & records["success"].astype(bool)][0]
    records.loc[broken, ["success", "logit_margin"]] = [False, LOGIT_TOLERANCE / 2]
    records.to_parquet(path, index=False)
    assert main(["check", STEM, "--entries", str(spheres_entries), "--no-progress"]) == 0
    output = capsys.readouterr().out
    assert (
        "ok   " in output
        and "1 borderline flips within tolerance" in output
        and "borderline: pgd linf" in output
        and "success False -> True" in output
    )
    # The same flip with a stored margin well beyond the tolerance is a regression.
    records.loc[broken, "logit_margin"] = 2.0
    records.to_parquet(path, index=False)
    assert main(["check", STEM, "--entries", str(spheres_entries), "--no-progress"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_borderline_flips_cannot_pile_up_into_another_figure(spheres_entries, capsys):
    path, records = _records(spheres_entries)
    group = records[records["ran"] & (records["eps"] == 0.05)]
    flips = group.index[group["success"].astype(bool)][: int(AGGREGATE_TOLERANCE * len(group)) + 2]
    assert len(flips) >= 2
    records.loc[flips, "success"] = False
    records.loc[flips, "logit_margin"] = LOGIT_TOLERANCE / 2
    records.to_parquet(path, index=False)
    assert main(["check", STEM, "--entries", str(spheres_entries), "--no-progress"]) == 1
    assert "attack success rate moved" in capsys.readouterr().out


def test_one_changed_weight_fails_the_check_even_with_the_sha256_updated(spheres_entries, capsys):
    card_path = registry.CARDS_DIR / "spheres-mlp-pgd-linf.toml"
    checkpoint = registry.CHECKPOINTS_DIR / "spheres-mlp-pgd-linf.pt"
    state = torch.load(checkpoint, map_location="cpu")
    last = [key for key in state if key.endswith("bias")][-1]
    state[last][1] += 0.5
    torch.save(state, checkpoint)
    # Without the sha256 updated the model refuses to load; with it (a re-trained model whose card was
    # updated, an entry edited), the per-point comparison finds the change.
    assert main(["check", STEM, "--entries", str(spheres_entries), "--no-progress"]) == 1
    assert "was replaced" in capsys.readouterr().out
    new_sha = sha256_file(checkpoint)
    card_path.write_text(card_path.read_text().replace(get_card("spheres-mlp-pgd-linf").checkpoint_sha256, new_sha))
    entry_path = spheres_entries / f"{STEM}.json"
    entry_path.write_text(
        entry_path.read_text().replace(json.loads(entry_path.read_text())["checkpoint_sha256"], new_sha)
    )
    assert main(["check", STEM, "--entries", str(spheres_entries), "--no-progress"]) == 1
    output = capsys.readouterr().out
    assert "FAIL" in output and "the model's margins moved by" in output


def test_an_attack_option_changed_behind_the_entrys_back_fails_the_check(spheres_entries, monkeypatch, capsys):
    # The entry records pgd with steps=10 and Foolbox's default relative step size; the default moves.
    monkeypatch.setitem(foolbox_attacks.PGD_DEFAULT_REL_STEPSIZE, "linf", 0.002)
    assert main(["check", STEM, "--entries", str(spheres_entries), "--no-progress"]) == 1
    assert "success True -> False" in capsys.readouterr().out


def test_a_changed_oracle_member_fails_the_check(tmp_path, isolated_registry, mnist, capsys):
    for name in ["mnist-cnn-standard", *(f"oracle-mnist-reader-{index}" for index in range(3))]:
        isolated_registry(name)
    oracles = registry.CARDS_DIR.parent / "oracles"
    oracles.mkdir()
    definition = {
        "name": "proxy:test-readers",
        "dataset": "mnist",
        "notes": "three readers",
        "members": [f"oracle-mnist-reader-{index}" for index in range(3)],
        "views": [{"stretch": 1.0, "closing": 3}],
        "knn": 0,
        "agreement": 0.6,
    }
    (oracles / "test-readers.toml").write_text(tomli_w.dumps(definition))
    config = RunConfig(
        (ModelSpec("mnist-cnn-standard", "mnist"),),
        (ThreatModel("linf", (0.4,)),),
        (AttackSpec("invariance-linf"),),
        n=10,
        shard_size=10,
        oracle="proxy:test-readers",
    )
    run_benchmark(config, tmp_path / "runs", name="run", progress=False)
    entries = tmp_path / "entries"
    add_run(tmp_path / "runs" / "run", entries)
    stem = "mnist-cnn-standard__mnist__invariance"
    assert main(["check", stem, "--entries", str(entries), "--no-progress"]) == 0
    capsys.readouterr()
    # A member re-trained (another checkpoint under the same card name) changes the judge.
    shutil.copy(
        registry.CHECKPOINTS_DIR / "oracle-mnist-reader-1.pt", registry.CHECKPOINTS_DIR / "oracle-mnist-reader-0.pt"
    )
    card = registry.CARDS_DIR / "oracle-mnist-reader-0.toml"
    card.write_text(
        card.read_text().replace(
            get_card("oracle-mnist-reader-0").checkpoint_sha256, get_card("oracle-mnist-reader-1").checkpoint_sha256
        )
    )
    assert main(["check", stem, "--entries", str(entries), "--no-progress"]) == 1
    assert "oracle proxy:test-readers: members" in capsys.readouterr().out
