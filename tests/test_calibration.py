"""Oracle calibration against people's labels, oracle views and named oracle files."""

import numpy as np
import pytest
import torch

from invarbench.cli import main
from invarbench.errors import ConfigError, DataError
from invarbench.oracles.calibration import calibrate, calibrate_sets, labelled_sets
from invarbench.oracles.types import (
    ABSTAIN,
    InvarianceSet,
    Oracle,
    OracleDefinition,
    ProxyOracle,
    View,
    get_oracle_definition,
    list_oracles,
)


class _Fixed(Oracle):
    """Returns prepared labels in order, whatever the images."""

    name = "fixed"

    def __init__(self, labels):
        self.labels = torch.tensor(labels)

    def label(self, images):
        return self.labels[: len(images)]


def test_calibration_counts_by_hand():
    # Original labels 1; people read 7 on the first four, 1 on the last four.
    people = torch.tensor([7, 7, 7, 7, 1, 1, 1, 1])
    oracle = _Fixed([7, 9, 1, ABSTAIN, 1, 1, 4, ABSTAIN])
    labelled = InvarianceSet("toy", torch.zeros(8, 1, 28, 28), people, torch.arange(8))
    result = calibrate(oracle, labelled, torch.ones(8, dtype=torch.long))
    assert (result.items, result.abstained, result.decided) == (8, 2, 6)
    # Decided changed items: 7 (sees, agrees), 9 (sees, disagrees), 1 (misses); unchanged: 1, 1 (agree),
    # 4 (false change).
    assert (result.changed, result.saw_change, result.unchanged, result.called_change, result.agreed) == (3, 2, 3, 1, 3)
    assert (
        result.sees_change == pytest.approx(2 / 3)
        and result.false_change == pytest.approx(1 / 3)
        and result.agreement == pytest.approx(0.5)
    )
    stored = result.to_dict()
    assert stored["abstention_rate"] == pytest.approx(0.25) and len(stored["sees_change_ci95"]) == 2
    assert type(result).from_dict(stored) == result


def test_views_stretch_contrast_and_close_gaps():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 1:8] = 0.4
    image[0, 0, 4, 4] = 0.0  # a one-pixel break in a faint stroke
    stretched = View(stretch=0.4)(image)
    assert stretched[0, 0, 4, 1] == 1.0 and stretched[0, 0, 4, 4] == 0.0
    closed = View(stretch=0.4, closing=3)(image)
    assert closed[0, 0, 4, 4] == 1.0, "the break is bridged"
    assert closed[0, 0, 2].sum() == 0, "nothing appears away from the stroke"
    assert torch.equal(View()(image), image)
    with pytest.raises(ConfigError, match="stretch"):
        View(stretch=0.0)
    with pytest.raises(ConfigError, match="closing"):
        View(closing=2)


class _Threshold(torch.nn.Module):
    """Class 1 when any pixel is at full brightness, else class 0."""

    def forward(self, images):
        bright = (images.flatten(1).max(1).values >= 1.0).float()
        return torch.stack([1 - bright, bright], dim=1)


def test_proxy_oracle_votes_over_members_and_views():
    faint = torch.full((2, 1, 4, 4), 0.5)
    plain = ProxyOracle("proxy:plain", [_Threshold()], num_classes=2, agreement=1.0)
    assert plain.label(faint).tolist() == [0, 0]
    stretched = ProxyOracle("proxy:stretched", [_Threshold()], views=(View(stretch=0.5),), num_classes=2, agreement=1.0)
    assert stretched.label(faint).tolist() == [1, 1]
    both = ProxyOracle("proxy:both", [_Threshold()], views=(View(), View(stretch=0.5)), num_classes=2, agreement=1.0)
    assert both.voters == 2 and both.label(faint).tolist() == [ABSTAIN, ABSTAIN]
    assert both.probabilities(faint)[0].tolist() == pytest.approx(
        [0.5 * (1 / (1 + np.e**-1)) + 0.5 * (1 - 1 / (1 + np.e**-1)), 0.5]
    )


def test_named_oracles_load_and_refuse_unknown_names(tmp_path):
    names = list_oracles()
    assert {"proxy:mnist-ensemble", "proxy:mnist-readers"} <= set(names)
    with pytest.raises(ConfigError, match="unknown oracle 'proxy:mnist-reader'.*Did you mean proxy:mnist-readers"):
        get_oracle_definition("proxy:mnist-reader")
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "proxy:x"\ndataset = "mnist"\n')
    with pytest.raises(ConfigError, match="lacks members, agreement, notes"):
        OracleDefinition.from_toml(broken)
    bad_view = tmp_path / "view.toml"
    bad_view.write_text(
        'name = "proxy:x"\ndataset = "mnist"\nmembers = []\nagreement = 1.0\nnotes = ""\nviews = [{blur = 3}]\n'
    )
    with pytest.raises(ConfigError, match="a view is a table of stretch and closing"):
        OracleDefinition.from_toml(bad_view)


def _tramer_folder(root, images, labels, indices):
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "indexs.npy", np.asarray(indices))
    np.save(root / "set.npy", np.asarray(images))
    np.save(root / "set_labels.npy", np.asarray(labels))
    return root


def test_calibration_of_a_named_oracle_on_real_digits(mnist, tmp_path):
    # Unchanged test digits labelled by "people" with their own labels: a good oracle calls no change.
    indices = np.arange(40)
    folder = _tramer_folder(
        tmp_path / "people",
        (mnist.test_images[:40, 0].numpy() * 255).round().astype(np.uint8),
        mnist.test_labels[:40].numpy(),
        indices,
    )
    sets = labelled_sets(folder)
    assert [item.name for item in sets] == ["people/set"]
    oracle = get_oracle_definition("proxy:mnist-readers").build(mnist)
    (result,) = calibrate_sets(oracle, sets, mnist.test_labels)
    assert result.changed == 0 and result.unchanged == result.decided
    assert result.called_change <= 1 and result.abstained <= 4
    with pytest.raises(DataError, match="outside the 10000 test points"):
        calibrate_sets(
            oracle,
            [InvarianceSet("far", sets[0].images[:1], sets[0].labels[:1], torch.tensor([20_000]))],
            mnist.test_labels,
        )


def test_oracle_evaluate_command(mnist, tmp_path, capsys):
    indices = np.arange(10)
    folder = _tramer_folder(
        tmp_path / "people",
        (mnist.test_images[:10, 0].numpy() * 255).round().astype(np.uint8),
        (mnist.test_labels[:10].numpy() + 1) % 10,
        indices,
    )
    assert main(["oracle", "evaluate", "proxy:mnist-readers", "--labels", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "people/set" in out and "sees change people saw" in out
    # People read every image as another digit; the oracle reads the test digit, so it sees no change.
    assert "0.0% (0/" in out.split("people/set")[1]
    assert main(["oracle", "evaluate", "proxy:mnist-readers", "--labels", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    mismatched = _tramer_folder(
        tmp_path / "mismatched", np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.int64), np.arange(3)
    )
    assert main(["oracle", "evaluate", "proxy:mnist-readers", "--labels", str(mismatched)]) == 1
    assert "expected 3 integer labels" in capsys.readouterr().err
    assert main(["oracle", "list"]) == 0
    assert "proxy:mnist-readers" in capsys.readouterr().out


def test_labels_outside_digits_are_refused(tmp_path):
    folder = _tramer_folder(tmp_path / "bad", np.zeros((2, 28, 28), np.uint8), np.array([3, 10]), np.arange(2))
    before = {path: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(DataError, match="labels from 3 to 10.*digits 0-9"):
        labelled_sets(folder)
    assert {path: path.read_bytes() for path in folder.iterdir()} == before


def test_run_with_a_named_oracle_records_it(tmp_path, capsys):
    from invarbench.attacks import ThreatModel
    from invarbench.config import AttackSpec, ModelSpec, RunConfig
    from invarbench.runner import run_benchmark

    config = RunConfig(
        (ModelSpec("spheres-mlp-standard", "spheres"),),
        (ThreatModel("linf", (0.025,)),),
        (AttackSpec("invariance-linf"),),
        n=20,
        shard_size=20,
        oracle="exact:spheres",
    )
    outcome = run_benchmark(config, tmp_path, name="run", progress=False)
    report = outcome.summary["oracles"]["exact:spheres"]
    assert report["exact"] is True and report["calibration"] == []
    assert "oracle" not in RunConfig(config.models, config.threats, config.attacks, n=20).to_dict(), (
        "runs without --oracle keep their digest"
    )
    assert (
        main(
            [
                "run",
                "spheres-mlp-standard",
                "--threat",
                "linf:0.025",
                "--attack",
                "invariance-linf",
                "--n",
                "20",
                "--oracle",
                "proxy:nothing",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 1
    )
    assert "unknown oracle 'proxy:nothing'" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["run"], "nothing written for the refused run"
    assert (
        main(
            [
                "run",
                "spheres-mlp-standard",
                "--attack",
                "invariance-linf",
                "--n",
                "20",
                "--oracle",
                f"people:{tmp_path / 'none.sqlite'}",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 1
    )
    assert "does not exist" in capsys.readouterr().err and [path.name for path in tmp_path.iterdir()] == ["run"]
