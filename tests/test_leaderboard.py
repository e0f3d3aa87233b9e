import json

import pandas as pd
import pytest

from invarbench.attacks import ThreatModel
from invarbench.cli import main
from invarbench.config import AttackSpec, ModelSpec, RunConfig
from invarbench.errors import ConfigError
from invarbench.leaderboard.entries import add_run, load_entries
from invarbench.leaderboard.tables import build_tables, perturbation_table
from invarbench.runner import run_benchmark


@pytest.fixture(scope="module")
def spheres_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    config = RunConfig(
        (ModelSpec("spheres-mlp-standard", "spheres"), ModelSpec("spheres-mlp-pgd-linf", "spheres")),
        (ThreatModel("linf", (0.025,)),),
        (AttackSpec("fgsm"), AttackSpec("pgd", (("steps", 10),)), AttackSpec("invariance-linf")),
        n=40,
        shard_size=20,
    )
    run_benchmark(config, out, name="run", progress=False)
    return out / "run"


def test_add_writes_entries_with_settings_and_regression_records(spheres_run, tmp_path):
    written = add_run(spheres_run, tmp_path, regression_points=25)
    assert sorted(path.name for path in written if path.suffix == ".json") == [
        "spheres-mlp-pgd-linf__spheres__invariance.json",
        "spheres-mlp-pgd-linf__spheres__perturbation.json",
        "spheres-mlp-standard__spheres__invariance.json",
        "spheres-mlp-standard__spheres__perturbation.json",
    ]
    entry = json.loads((tmp_path / "spheres-mlp-pgd-linf__spheres__perturbation.json").read_text())
    summary = json.loads((spheres_run / "summary.json").read_text())
    assert entry["results"]["threats"] == summary["models"]["spheres-mlp-pgd-linf"]["threats"]
    assert entry["settings"]["n"] == 40 and [attack["name"] for attack in entry["settings"]["attacks"]] == [
        "fgsm",
        "pgd",
    ]
    assert entry["checkpoint_sha256"] == summary["models"]["spheres-mlp-pgd-linf"]["checkpoint_sha256"]
    assert (tmp_path / "spheres-mlp-pgd-linf__spheres__invariance__invariance-linf.gallery.png").exists()
    records = pd.read_parquet(tmp_path / entry["regression"]["file"])
    assert entry["regression"]["points"] == 40, "25 points rounded up to whole shards of 20"
    assert set(records["index"]) == set(range(40)) and set(records["model"]) == {"spheres-mlp-pgd-linf"}
    assert "oracle_label" in pd.read_parquet(tmp_path / "spheres-mlp-pgd-linf__spheres__invariance.parquet")


def test_add_can_keep_one_track_of_a_run(spheres_run, tmp_path):
    written = add_run(spheres_run, tmp_path, tracks=("invariance",))
    assert sorted(path.name for path in written if path.suffix == ".json") == [
        "spheres-mlp-pgd-linf__spheres__invariance.json",
        "spheres-mlp-standard__spheres__invariance.json",
    ]
    assert not list(tmp_path.glob("*perturbation*")), "the run's PGD entry was not written"
    assert (
        main(["leaderboard", "add", str(spheres_run), "--entries", str(tmp_path / "p"), "--track", "perturbation"]) == 0
    )
    assert sorted(path.name for path in (tmp_path / "p").glob("*.json")) == [
        "spheres-mlp-pgd-linf__spheres__perturbation.json",
        "spheres-mlp-standard__spheres__perturbation.json",
    ]
    with pytest.raises(ConfigError, match="unknown track robustness"):
        add_run(spheres_run, tmp_path, tracks=("robustness",))


def test_conflicting_incomplete_and_hand_edited_entries_are_refused(spheres_run, tmp_path):
    add_run(spheres_run, tmp_path)
    path = tmp_path / "spheres-mlp-standard__spheres__perturbation.json"
    entry = json.loads(path.read_text())
    entry["settings"]["n"] = 1000
    path.write_text(json.dumps(entry))
    with pytest.raises(ConfigError, match="--replace"):
        add_run(spheres_run, tmp_path)
    add_run(spheres_run, tmp_path, replace=True)
    del entry["results"]
    path.write_text(json.dumps(entry))
    with pytest.raises(ConfigError, match="lacks results"):
        load_entries(tmp_path)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(ConfigError, match="not a finished invarbench run"):
        add_run(unfinished, tmp_path)


def test_tables_rank_by_worst_case_and_rebuild_byte_identically(spheres_run, tmp_path):
    entries_dir, out = tmp_path / "entries", tmp_path / "out"
    assert main(["leaderboard", "add", str(spheres_run), "--entries", str(entries_dir)]) == 0
    assert (
        main(
            ["leaderboard", "build", "--entries", str(entries_dir), "--out", str(out), "--site", str(tmp_path / "site")]
        )
        == 0
    )
    assert (tmp_path / "site" / "index.html").exists()
    names = sorted(path.name for path in out.iterdir() if path.is_file())
    # Each model's own robustness curves over the others', for its page.
    assert sorted(path.name for path in (out / "models").iterdir()) == [
        f"{model}-robustness.svg" for model in ("spheres-mlp-pgd-linf", "spheres-mlp-standard")
    ]
    tables = [
        f"spheres-{track}.{suffix}"
        for track in ("perturbation", "invariance", "oracles")
        for suffix in ("md", "csv", "tex", "html")
    ] + ["spheres-perturbation-summary.md", "spheres-invariance-summary.md"]
    plots = [f"spheres-{kind}.svg" for kind in ("robustness-linf", "tradeoff-linf-0.025")]
    assert names == sorted(tables + plots)
    first = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    build_tables(entries_dir, out)
    assert first == {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    table = perturbation_table(load_entries(entries_dir), "spheres")
    worst = table["linf 0.025 worst case"].tolist()
    assert worst == sorted(worst, reverse=True) and table["rank"].tolist() == [1, 2]
    assert "invariance accuracy linf:0.025" in table
    # The exact oracle needs no calibration, and the invariance table says which oracle judged and how it is trusted.
    assert (
        "exact:spheres" in (out / "spheres-oracles.md").read_text()
        and "exact (labelling function" in (out / "spheres-invariance.md").read_text()
    )
    assert [column for column in table.columns if column.startswith("linf 0.025")] == [
        "linf 0.025 after fgsm",
        "linf 0.025 after pgd:steps=10",
        "linf 0.025 worst case",
    ], "cascade order"
    summary = perturbation_table(load_entries(entries_dir), "spheres", summary=True)
    assert summary["linf 0.025"].tolist() == worst and "linf 0.025 after fgsm" not in summary
    markdown = (out / "spheres-perturbation.md").read_text()
    assert "spheres-mlp-pgd-linf" in markdown and "%" in markdown
    assert (
        main(
            [
                "leaderboard",
                "build",
                "--entries",
                str(tmp_path / "none"),
                "--out",
                str(out),
                "--site",
                str(tmp_path / "site"),
            ]
        )
        == 1
    )


def test_check_passes_then_fails_with_a_diff_when_pgd_is_weakened(tmp_path, monkeypatch, capsys, mnist):
    from invarbench.attacks import foolbox_attacks

    config = RunConfig(
        (ModelSpec("mnist-cnn-standard", "mnist"),),
        (ThreatModel("linf", (0.3,)),),
        (AttackSpec("pgd"),),
        n=40,
        shard_size=20,
    )
    run_benchmark(config, tmp_path, name="run", progress=False)
    entries_dir = tmp_path / "entries"
    add_run(tmp_path / "run", entries_dir)
    assert (
        main(["check", "mnist-cnn-standard__mnist__perturbation", "--entries", str(entries_dir), "--no-progress"]) == 0
    )
    assert "ok   mnist-cnn-standard__mnist__perturbation" in capsys.readouterr().out
    # pgd (invarbench's engine, recorded in the entry) weakened to one step by default.
    monkeypatch.setitem(foolbox_attacks.PGD_DEFAULT_STEPS, "linf", 1)
    assert (
        main(["check", "mnist-cnn-standard__mnist__perturbation", "--entries", str(entries_dir), "--no-progress"]) == 1
    )
    output = capsys.readouterr().out
    assert (
        "FAIL mnist-cnn-standard__mnist__perturbation" in output
        and "pgd linf 0.3 point" in output
        and "success True -> False" in output
    )
    monkeypatch.undo()
    assert main(["check", "mnist-cnn-standard", "--entries", str(entries_dir), "--no-progress"]) == 0


def test_check_passes_on_one_track_kept_from_a_run_with_more_attacks(spheres_run, tmp_path, capsys):
    # The run's attacks are fgsm, pgd, invariance-linf; the invariance entry keeps only the last, so its
    # re-evaluation numbers the attacks differently from the stored records (a first version compared
    # by position and reported every stored point as missing).
    entries_dir = tmp_path / "entries"
    add_run(spheres_run, entries_dir, tracks=("invariance",))
    assert (
        main(["check", "spheres-mlp-pgd-linf__spheres__invariance", "--entries", str(entries_dir), "--no-progress"])
        == 0
    )
    assert "ok   spheres-mlp-pgd-linf__spheres__invariance" in capsys.readouterr().out
    records = entries_dir / "spheres-mlp-pgd-linf__spheres__invariance.parquet"
    stored = pd.read_parquet(records)
    changed = stored["oracle_label"].notna() & (
        stored["index"] == stored.loc[stored["oracle_label"].notna(), "index"].min()
    )
    stored.loc[changed, "model_prediction"] = 1 - stored.loc[changed, "model_prediction"]
    stored.to_parquet(records, index=False)
    assert (
        main(["check", "spheres-mlp-pgd-linf__spheres__invariance", "--entries", str(entries_dir), "--no-progress"])
        == 1
    )
    assert "invariance-linf linf 0.025 point" in capsys.readouterr().out


def test_check_fails_when_the_checkpoint_no_longer_matches(spheres_run, tmp_path, capsys):
    entries_dir = tmp_path / "entries"
    add_run(spheres_run, entries_dir)
    path = entries_dir / "spheres-mlp-pgd-linf__spheres__perturbation.json"
    entry = json.loads(path.read_text())
    entry["checkpoint_sha256"] = "0" * 64
    path.write_text(json.dumps(entry))
    assert (
        main(["check", "spheres-mlp-pgd-linf__spheres__perturbation", "--entries", str(entries_dir), "--no-progress"])
        == 1
    )
    assert "checkpoint sha256" in capsys.readouterr().out


def test_readme_blocks_are_replaced_by_the_built_tables(spheres_run, tmp_path):
    from invarbench.leaderboard.tables import sync_readme

    add_run(spheres_run, tmp_path / "entries")
    build_tables(tmp_path / "entries", tmp_path / "out")
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- leaderboard:spheres-perturbation -->\nstale\n<!-- /leaderboard:spheres-perturbation -->\nend\n"
    )
    assert sync_readme(readme, tmp_path / "out") == ["spheres-perturbation"]
    text = readme.read_text()
    assert (
        "stale" not in text
        and (tmp_path / "out" / "spheres-perturbation.md").read_text() in text
        and text.endswith("end\n")
    )
    readme.write_text("<!-- leaderboard:cifar10-perturbation -->\n<!-- /leaderboard:cifar10-perturbation -->\n")
    with pytest.raises(FileNotFoundError, match="was not built"):
        sync_readme(readme, tmp_path / "out")


def test_entries_keep_the_minimum_norm_curve_and_it_agrees_with_the_per_eps_records(tmp_path):
    from invarbench.leaderboard.entries import curve_median_norm, curve_robust_accuracy
    from invarbench.leaderboard.plots import build_plots

    config = RunConfig(
        (ModelSpec("spheres-mlp-standard", "spheres"),),
        (ThreatModel("linf", (0.01, 0.02, 0.03)), ThreatModel("l2", (0.05, 0.1))),
        (AttackSpec("pgd", (("steps", 10),)), AttackSpec.parse("fmn:steps=50,cascade=false")),
        n=40,
        shard_size=20,
    )
    run_benchmark(config, tmp_path, name="run", progress=False)
    add_run(tmp_path / "run", tmp_path / "entries")
    entry = json.loads((tmp_path / "entries" / "spheres-mlp-standard__spheres__perturbation.json").read_text())
    records = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert set(entry["results"]["curves"]) == {"linf", "l2"}
    for norm, curve in entry["results"]["curves"].items():
        assert (
            curve["attack"] == "fmn" and curve["n"] == 40 and curve["minimal_norms"] == sorted(curve["minimal_norms"])
        )
        for eps in {"linf": (0.01, 0.02, 0.03), "l2": (0.05, 0.1)}[norm]:
            fmn = records[(records["attack"] == "fmn") & (records["norm"] == norm) & (records["eps"] == eps)]
            robust = int((fmn["ran"] & ~fmn["success"].astype(bool)).sum())
            assert curve_robust_accuracy(curve, eps) == robust / 40, (norm, eps)
        fmn = records[(records["attack"] == "fmn") & (records["norm"] == norm)]
        first = fmn[fmn["eps"] == fmn["eps"].min()].sort_values("index")
        everyone = sorted(first["perturbation_norm"].where(first["ran"], 0.0).fillna(float("inf")).tolist())
        assert curve_median_norm(curve) == pytest.approx(everyone[(len(everyone) - 1) // 2], rel=1e-5), (
            "misclassified points count as 0"
        )
    assert curve_median_norm({"n": 5, "attacked": 4, "minimal_norms": [0.1, 0.2, 0.3], "not_found": 1}) == 0.2
    table = perturbation_table([entry], "spheres")
    assert table["l2 median min. norm"].iloc[0] == curve_median_norm(entry["results"]["curves"]["l2"])
    written = build_plots([entry], tmp_path / "plots")
    assert {path.name for path in written} >= {"spheres-robustness-linf.svg", "spheres-robustness-l2.svg"}


def test_perturbation_entries_get_a_gallery_of_reproduced_adversarial_examples(tmp_path, mnist):
    from invarbench.gallery import perturbation_gallery

    config = RunConfig(
        (ModelSpec("mnist-cnn-standard", "mnist"),),
        (ThreatModel("linf", (0.05, 0.3)),),
        (AttackSpec("pgd", (("steps", 10),)),),
        n=20,
        shard_size=20,
    )
    run_benchmark(config, tmp_path, name="run", progress=False)
    written = add_run(tmp_path / "run", tmp_path / "entries")
    gallery = tmp_path / "entries" / "mnist-cnn-standard__mnist__perturbation__pgd.gallery.png"
    assert gallery in written and gallery.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entry = json.loads((tmp_path / "entries" / "mnist-cnn-standard__mnist__perturbation.json").read_text())
    again = perturbation_gallery(entry, tmp_path / "entries", tmp_path / "again.png")
    assert again.read_bytes() == gallery.read_bytes(), "recomputed examples are the run's: same bytes twice"
    # Records that say PGD broke nothing leave nothing to draw: the gallery never shows an outcome the entry does
    # not hold.
    records = pd.read_parquet(tmp_path / "entries" / entry["regression"]["file"])
    records["success"] = records["success"].where(records["success"].isna(), False)
    records.to_parquet(tmp_path / "entries" / entry["regression"]["file"], index=False)
    with pytest.raises(ConfigError, match="broke no point of the first shard reproducibly"):
        perturbation_gallery(entry, tmp_path / "entries", tmp_path / "none.png")
