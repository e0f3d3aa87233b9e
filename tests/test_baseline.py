"""Baselines: the stored entries' headline results, compared with entries that replace them."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from invarbench.cli import main
from invarbench.errors import InvarbenchError
from invarbench.leaderboard.baseline import comparison_frame, take_baseline, write_baseline

ENTRIES = Path(__file__).resolve().parents[1] / "leaderboard" / "entries"
MODEL = "mnist-cnn-pgd-linf-0.3"


def copy_entries(target: Path, model: str = MODEL) -> Path:
    target.mkdir()
    for path in ENTRIES.glob(f"{model}__mnist__perturbation*"):
        shutil.copy(path, target / path.name)
    return target


def test_a_baseline_of_the_stored_entries_holds_both_headline_threats_of_every_mnist_model():
    baseline = take_baseline(ENTRIES)
    mnist = [pair for pair in baseline["pairs"] if pair["dataset"] == "mnist"]
    models = {pair["model"] for pair in mnist}
    assert len(mnist) == 2 * len(models) >= 14
    for pair in mnist:
        assert pair["n"] == 1000 and set(pair["broken"]) <= set(pair["correct"])
        assert set(pair["autoattack_broken"]) <= set(pair["broken"])
    # Every pair of the committed baseline is what the stored entries hold (until they are regenerated).
    committed = json.loads((ENTRIES.parent / "baselines" / "autoattack-2026-11.json").read_text())
    assert {(pair["model"], pair["norm"]) for pair in committed["pairs"]} == {
        (pair["model"], pair["norm"]) for pair in baseline["pairs"]
    }


def test_entries_compared_with_their_own_baseline_are_as_strong(tmp_path):
    entries = copy_entries(tmp_path / "entries")
    frame = comparison_frame([("own", take_baseline(entries))], entries, "mnist")
    assert len(frame) == 2
    assert (frame["as strong"] == "yes").all()
    assert (frame["broken only by the baseline"] == "none").all()
    assert (frame["difference (points)"] == "+0.0").all()


def test_a_weaker_entry_is_caught_by_its_worst_case_and_by_the_points_only_the_baseline_broke(tmp_path):
    entries = copy_entries(tmp_path / "entries")
    baseline = take_baseline(entries)
    # Weaken the entry: two points the baseline broke at l_inf 0.3 are now robust, and its worst case 0.2 points higher.
    stem = f"{MODEL}__mnist__perturbation"
    records = pd.read_parquet(entries / f"{stem}.parquet")
    at = (records["norm"] == "linf") & ((records["eps"] - 0.3).abs() < 1e-9)
    lost = sorted(records[at & records["success"]]["index"].unique())[:2]
    records.loc[at & records["index"].isin(lost), "success"] = False
    records.to_parquet(entries / f"{stem}.parquet")
    entry = json.loads((entries / f"{stem}.json").read_text())
    worst = entry["results"]["threats"]["linf"]["0.3"]["worst_case"]
    worst["robust"] += 2
    worst["robust_accuracy"] = round(worst["robust_accuracy"] + 0.002, 6)
    (entries / f"{stem}.json").write_text(json.dumps(entry))

    frame = comparison_frame([("before", baseline)], entries, "mnist").set_index("threat")
    assert frame.loc["linf 0.3", "as strong"] == "no"
    assert frame.loc["linf 0.3", "difference (points)"] == "+0.2"
    assert frame.loc["linf 0.3", "broken only by the baseline"] == ", ".join(map(str, lost))
    assert frame.loc["l2 2", "as strong"] == "yes"


def test_a_baseline_is_written_once(tmp_path):
    path = write_baseline(take_baseline(copy_entries(tmp_path / "entries")), tmp_path / "b.json")
    assert json.loads(path.read_text())["pairs"]
    with pytest.raises(InvarbenchError, match="written once"):
        write_baseline({"schema": 1, "pairs": []}, path)


def test_the_cli_takes_a_baseline_beside_the_entries(tmp_path, capsys):
    entries = copy_entries(tmp_path / "entries")
    assert main(["leaderboard", "baseline", "--entries", str(entries), "--note", "test"]) == 0
    written = list((tmp_path / "baselines").glob("*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["note"] == "test"
    assert main(["leaderboard", "baseline", "--entries", str(tmp_path / "missing")]) != 0
    assert "no perturbation entry" in capsys.readouterr().err


@pytest.mark.mnist
def test_a_reference_attack_names_the_points_the_entry_missed_and_shows_in_the_table(tmp_path, capsys):
    from invarbench.leaderboard.reference import load_reference
    from invarbench.leaderboard.tables import build_tables

    model = "mnist-cnn-standard"
    entries = copy_entries(tmp_path / "entries", model)
    stem = f"{model}__mnist__perturbation"
    entry = json.loads((entries / f"{stem}.json").read_text())
    entry["regression"]["points"] = 12  # a small subset: the reference runs on the first 12 points
    (entries / f"{stem}.json").write_text(json.dumps(entry))
    # The entry's records "missed" points 3 and 7 at l_inf 0.3: a reference attack that breaks them must say so.
    records = pd.read_parquet(entries / f"{stem}.parquet")
    at = (records["norm"] == "linf") & ((records["eps"] - 0.3).abs() < 1e-9)
    records.loc[at & records["index"].isin([3, 7]), "success"] = False
    records.to_parquet(entries / f"{stem}.parquet")

    argv = ["leaderboard", "reference", model, "--entries", str(entries), "--runs", str(tmp_path / "runs")]
    assert main([*argv, "--attack", "pgd", "--no-progress"]) == 0
    assert "linf 0.3 2 missed (3, 7)" in capsys.readouterr().out
    reference = load_reference(entries, entry)
    linf = next(threat for threat in reference["threats"] if threat["norm"] == "linf")
    assert linf["points"] == 12 and linf["missed"] == [3, 7]
    build_tables(entries, tmp_path / "out")
    table = (tmp_path / "out" / "mnist-perturbation.md").read_text()
    assert "pgd on 12 points: linf 0.3 2 missed (3, 7)" in table

    # A reference made for an earlier version of the entry is not shown.
    entry["date"] = "2030-01-01T00:00:00+00:00"
    assert load_reference(entries, entry) is None
