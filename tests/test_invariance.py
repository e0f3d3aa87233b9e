"""Invariance attacks, oracles and metrics, each checked against something independent."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from invarbench.attacks import ThreatModel, create_attack
from invarbench.attacks.invariance import (
    TRAMER_TARGETS,
    InvarianceContext,
    affine_matrices,
    metamer_partners,
    random_affine_copies,
    transform_grid,
    warp,
)
from invarbench.config import AttackSpec, ModelSpec, RunConfig, entry_config, rerun_as
from invarbench.datasets import SPHERE_INNER_RADIUS, SPHERE_OUTER_RADIUS, Dataset, load_dataset, spheres_label
from invarbench.errors import ConfigError, DataError
from invarbench.io import sha256_file
from invarbench.leaderboard.check import judge_guided_warnings
from invarbench.metrics import invariance_metrics
from invarbench.models import build_architecture, load_model
from invarbench.models.wrapper import BenchmarkModel
from invarbench.neighbours import nearest, nearest_per_class
from invarbench.oracles.types import (
    ABSTAIN,
    ExactOracle,
    LabelFileOracle,
    ProxyOracle,
    default_oracle,
    load_invariance_sets,
    spheres_margin,
)
from invarbench.runner import run_benchmark
from invarbench.statistics import wilson_interval


def test_nearest_per_class_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    queries, references = torch.rand(37, 20, generator=generator), torch.rand(300, 20, generator=generator)
    labels = torch.randint(0, 4, (300,), generator=generator)
    distances, indices = nearest_per_class(queries, references, labels, 5, chunk_size=8)
    exact = torch.cdist(queries.double(), references.double()) ** 2
    for label in range(4):
        members = (labels == label).nonzero().flatten()
        best, position = exact[:, members].min(1)
        assert torch.equal(indices[:, label], members[position])
        assert torch.allclose(distances[:, label].double(), best, atol=1e-4)
    assert torch.isinf(distances[:, 4]).all() and (indices[:, 4] == -1).all(), "a class without references"
    _, top = nearest(queries, references, k=3, chunk_size=10)
    assert torch.equal(top, exact.topk(3, largest=False).indices)


def test_transform_grid_and_exact_inverse_for_whole_pixel_shifts(mnist):
    grid = transform_grid()
    assert len(grid) == 775 == 5 * 5 * 31
    images = mnist.test_images[:4]
    parameters = torch.tensor([[3.0, -3.0, 0.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    there = warp(images, affine_matrices(parameters, 28))
    back = warp(there, affine_matrices(parameters, 28, inverse=True))
    assert torch.allclose(back[..., 4:24, 4:24], images[..., 4:24, 4:24], atol=1e-5)
    point = torch.zeros(1, 1, 28, 28)
    point[0, 0, 10, 10] = 1
    moved = warp(point, affine_matrices(torch.tensor([[3.0, 0.0, 0.0]]), 28))
    assert moved[0, 0].argmax().item() == 10 * 28 + 13, "a shift of +3 in x moves content 3 pixels right"
    rotated = warp(point, affine_matrices(torch.tensor([[0.0, 0.0, 30.0]]), 28))
    back = warp(rotated, affine_matrices(torch.tensor([[0.0, 0.0, 30.0]]), 28, inverse=True))
    assert back[0, 0].argmax().item() == 10 * 28 + 10


def test_linf_search_on_spheres_is_exact_and_inside_the_ball():
    dataset = load_dataset("spheres")
    images, labels = dataset.evaluation_subset(300)
    model = load_model("spheres-mlp-pgd-linf")
    attack = create_attack("invariance-linf")
    eps = 0.025
    result = attack(
        model,
        images,
        labels,
        norm="linf",
        epsilons=(eps,),
        context=InvarianceContext(dataset, default_oracle(dataset), torch.arange(300)),
    )
    assert result.oracle == "exact:spheres"
    assert (result.perturbation_norms <= eps + 1e-6).all()
    # Closed form: the largest l_inf move of a point's radius is x +- eps sign(x); the label can change
    # exactly when that reaches past the midpoint between the spheres.
    midpoint = (SPHERE_INNER_RADIUS + SPHERE_OUTER_RADIUS) / 2
    outward = (images + eps * images.sign()).norm(dim=1)
    inward = (images - eps * images.sign()).norm(dim=1)
    reachable = torch.where(labels == 0, outward > midpoint, inward <= midpoint)
    changed = result.oracle_labels[0] != labels
    assert torch.equal(changed, reachable)
    assert changed.sum() > 10, "the robust MLP's balls contain label-changed points"
    assert torch.equal(result.oracle_labels[0], spheres_label(result.candidates[0]))
    with torch.no_grad():
        assert torch.equal(result.model_predictions[0], model(result.candidates[0]).argmax(1))


def _toy_images(count, seed):
    """Images of two strokes; class = which stroke (vertical 0, horizontal 1) with noise: a data set
    where the nearest other-class image is known."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (count,), generator=generator)
    images = torch.zeros(count, 1, 28, 28)
    for row, label in enumerate(labels.tolist()):
        offset = int(torch.randint(10, 18, (1,), generator=generator))
        if label == 0:
            images[row, 0, 6:22, offset] = 1
        else:
            images[row, 0, offset, 6:22] = 1
    return images, labels


def test_linf_neighbour_search_projects_aligns_and_keeps_least_ink():
    train_x, train_y = _toy_images(200, 0)
    test_x, test_y = _toy_images(6, 1)
    dataset = Dataset("toy", train_x, train_y, test_x, test_y, 2, (0.0, 1.0), "toy")
    model = BenchmarkModel(
        build_architecture("mlp", input_dim=784, hidden=(8,), num_classes=2), bounds=(0, 1), num_classes=2
    )
    oracle = ExactOracle(
        "exact:toy", lambda images: (images[:, 0, 14, 6:22].sum(1) > images[:, 0, 6:22, 14].sum(1)).long()
    )
    attack = create_attack("invariance-linf", targets="all", shifts=(0.0, 1.0), rotations=(0.0,))
    result = attack(
        model,
        test_x,
        test_y,
        norm="linf",
        epsilons=(0.3, 1.0),
        context=InvarianceContext(dataset, oracle, torch.arange(6)),
    )
    assert result.candidates.shape == (2, 6, 1, 28, 28)
    assert ((result.candidates[0] - test_x).abs() <= 0.3 + 1e-6).all()
    assert torch.equal(result.target_classes, (1 - test_y).repeat(2, 1))
    # At eps 1 the candidate is the aligned neighbour itself: a training image of the other class.
    for point in range(6):
        source = train_x[result.source_indices[1, point]]
        assert torch.allclose(result.candidates[1, point], source, atol=1e-5) or torch.allclose(
            result.candidates[1, point], torch.roll(source, -1, dims=-1), atol=1e-5
        )
    with pytest.raises(ConfigError, match="targets"):
        create_attack("invariance-linf", targets="some")


def test_tramer_target_map():
    assert TRAMER_TARGETS[0] == (4, 6, 8, 9) and TRAMER_TARGETS[9] == (3, 4, 5) and TRAMER_TARGETS[6] == (0,)
    assert all(label not in targets for label, targets in TRAMER_TARGETS.items())


def _write_set(folder, name, images, labels, indices=None, index_name="indexs.npy"):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{name}.npy", images)
    np.save(folder / f"{name}_labels.npy", labels)
    if indices is not None:
        np.save(folder / index_name, indices)


def test_label_file_oracle_reads_the_published_layout(tmp_path, mnist):
    images = (mnist.test_images[[3, 7, 11], 0].numpy() * 255).round().astype(np.uint8)
    _write_set(tmp_path / "linf", "automated_eps03", images, np.array([5, 1, 2]))
    _write_set(tmp_path / "l0", "automated", images.astype(np.float32), np.array([4, 4, 4]))
    np.save(tmp_path / "indexs.npy", np.array([3, 7, 11, 99]))
    sets = load_invariance_sets(tmp_path)
    assert [item.name for item in sets] == ["l0/automated", "linf/automated_eps03"]
    assert sets[1].original_indices.tolist() == [3, 7, 11]
    assert torch.allclose(sets[1].images, mnist.test_images[[3, 7, 11]], atol=1 / 255)
    oracle = LabelFileOracle([sets[1]])
    assert oracle.label(sets[1].images).tolist() == [5, 1, 2]
    assert oracle.label(torch.zeros(1, 1, 28, 28)).tolist() == [ABSTAIN]


def test_label_file_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_invariance_sets(tmp_path / "missing")
    with pytest.raises(DataError, match="no invariance set"):
        load_invariance_sets(tmp_path)
    _write_set(tmp_path / "a", "bad", np.zeros((2, 28, 27)), np.array([1, 2]), np.array([0, 1]))
    with pytest.raises(DataError, match="N x 28 x 28"):
        load_invariance_sets(tmp_path / "a")
    _write_set(tmp_path / "b", "short", np.zeros((2, 28, 28)), np.array([1]), np.array([0, 1]))
    with pytest.raises(DataError, match="integer labels"):
        load_invariance_sets(tmp_path / "b")
    _write_set(tmp_path / "c", "noindex", np.zeros((2, 28, 28)), np.array([1, 2]))
    with pytest.raises(DataError, match="no index file"):
        load_invariance_sets(tmp_path / "c")


class _Constant(torch.nn.Module):
    def __init__(self, label):
        super().__init__()
        self.label = label

    def forward(self, images):
        return torch.nn.functional.one_hot(torch.full((len(images),), self.label), 10).float()


def test_proxy_oracle_votes_and_abstains_on_disagreement():
    images = torch.zeros(3, 1, 28, 28)
    agreeing = ProxyOracle("proxy:test", [_Constant(3)] * 4 + [_Constant(5)], agreement=0.8)
    assert agreeing.label(images).tolist() == [3, 3, 3]
    split = ProxyOracle("proxy:test", [_Constant(3)] * 3 + [_Constant(5)] * 2, agreement=0.8)
    assert split.label(images).tolist() == [ABSTAIN] * 3
    train = torch.rand(50, 1, 28, 28)
    knn = ProxyOracle("proxy:knn", [], train_images=train, train_labels=torch.arange(50) % 10, k=1, agreement=1.0)
    assert knn.label(train[:7]).tolist() == list(range(7))
    with pytest.raises(ConfigError, match="agreement"):
        ProxyOracle("proxy:test", [], agreement=1.5)


def test_wilson_interval_and_metrics():
    low, high = wilson_interval(8, 10)
    assert abs(low - 0.4902) < 1e-3 and abs(high - 0.9433) < 1e-3  # textbook value for 8/10
    assert wilson_interval(0, 0) == [0.0, 1.0]
    rows = pd.DataFrame(
        {
            "ran": [True] * 5 + [False],
            "label": [1, 1, 1, 1, 1, 1],
            "oracle_label": pd.array([7, 7, 1, None, 7, 7], dtype="Int64"),
            "model_prediction": [7, 1, 1, 1, 1, 7],
            "oracle": "o",
            "perturbation_norm": 0.3,
            "logit_error": float("nan"),
        }
    )
    metrics = invariance_metrics(rows)
    assert metrics["candidates"] == 5 and metrics["abstained"] == 1 and metrics["label_changed"] == 3
    assert metrics["invariance_accuracy"] == pytest.approx(1 / 3) and metrics[
        "excessive_invariance_rate"
    ] == pytest.approx(2 / 3)


def test_exact_metamers_of_an_invertible_network(mnist):
    torch.manual_seed(0)
    network = build_architecture("fi-revnet", blocks=(1, 1), hidden=(8, 8), dense_blocks=1, dense_hidden=32)
    model = BenchmarkModel(network, bounds=(0, 1), num_classes=10, mean=(0.1307,), std=(0.3081,)).eval()
    images, labels = mnist.evaluation_subset(12)
    with torch.no_grad():
        z, _ = model.encode(images)
        assert z.shape == (12, 784)
        assert (model.decode(z) - images).abs().max() < 1e-4, "exact inverse"
    attack = create_attack("metameric")
    result = attack(
        model,
        images,
        labels,
        norm="metamer",
        epsilons=(0.0,),
        context=InvarianceContext(
            mnist, ExactOracle("exact:test", lambda x: torch.zeros(len(x), dtype=torch.long)), torch.arange(12)
        ),
    )
    assert result.logit_errors.max() < 1e-4
    partners = metamer_partners(labels)
    assert (labels[partners] != labels).all()
    assert torch.equal(result.target_classes[0], labels[partners])


def test_gradient_metamers_pull_logits_towards_the_source():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    model = BenchmarkModel(network, bounds=(0, 1), num_classes=3)
    images, labels = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    attack = create_attack("metameric", steps=50)
    result = attack(
        model,
        images,
        labels,
        norm="linf",
        epsilons=(0.05, 0.5),
        context=InvarianceContext(
            None, ExactOracle("exact:test", lambda x: torch.zeros(len(x), dtype=torch.long)), torch.arange(6)
        ),
    )
    partners = metamer_partners(labels)
    with torch.no_grad():
        start_error = (model(images[partners]) - model(images)).abs().amax(1)
    assert (result.logit_errors[1] < start_error).all()
    assert (result.logit_errors[1] <= result.logit_errors[0] + 1e-6).all(), "a larger ball matches at least as well"
    assert (result.perturbation_norms[0] <= 0.05 + 1e-6).all()


def test_l0_search_changes_at_most_the_budget(mnist):
    small = Dataset(
        "mnist",
        mnist.train_images[:2000],
        mnist.train_labels[:2000],
        mnist.test_images,
        mnist.test_labels,
        10,
        (0.0, 1.0),
        "mnist-first-2000",
    )
    model = load_model("mnist-cnn-standard")
    oracle = ProxyOracle("proxy:test", [load_model("mnist-cnn-pgd-l2-2.0")], agreement=1.0)
    attack = create_attack("invariance-l0", pixels=25, copies=1, max_clusters=4)
    images, labels = mnist.evaluation_subset(5)
    result = attack(
        model, images, labels, norm="l0", epsilons=(25.0,), context=InvarianceContext(small, oracle, torch.arange(5))
    )
    binary = (images > 0.5).float()
    changed = (result.candidates[0] != binary).flatten(1).sum(1)
    assert (changed <= 25).all() and torch.equal(changed.float(), result.perturbation_norms[0])
    assert set(result.candidates.unique().tolist()) <= {0.0, 1.0}
    assert (result.target_classes[0] != labels).all()
    copies = random_affine_copies(images, 2, seed=0)
    assert copies.shape == (10, 1, 28, 28) and not torch.equal(copies[:5], images)


# The ink the nearest class-1 training image adds to a blank class-0 point: two blobs in opposite corners
# of an 8 x 8 image, so the l_0 search has three candidates (blob A, blob B, both).
_BLOB_A = ((0, 0), (0, 1))
_BLOB_B = ((7, 7), (7, 6), (6, 7))


def _blob_image(*blobs):
    image = torch.zeros(1, 8, 8)
    for blob in blobs:
        for row, column in blob:
            image[0, row, column] = 1.0
    return image


def _blob_reader(prefer, avoid):
    """A linear reader of 8 x 8 images: class 1 where ``prefer`` has ink and ``avoid`` none, else class 0."""
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        network[1].weight.zero_()
        network[1].bias.copy_(torch.tensor([5.0, 0.0] + [-100.0] * 8))
        for blob, weight in ((prefer, 10.0), (avoid, -10.0)):
            for row, column in blob:
                network[1].weight[1, row * 8 + column] = weight
    return network


def _blob_search(tmp_path):
    """A data set whose one test point's l_0 candidates are blob A, blob B or both; a guide (a TorchScript
    file) that prefers A, and a voting judge that prefers B."""
    dataset = Dataset(
        "blobs",
        torch.stack([_blob_image(), _blob_image(_BLOB_A, _BLOB_B)]),
        torch.tensor([0, 1]),
        _blob_image().unsqueeze(0),
        torch.tensor([0]),
        10,
        (0.0, 1.0),
        "synthetic",
    )
    guide = tmp_path / "guide-prefers-a.pt"
    torch.jit.save(torch.jit.script(_blob_reader(_BLOB_A, _BLOB_B)), guide)
    judge = ProxyOracle("proxy:judge", [_blob_reader(_BLOB_B, _BLOB_A)], agreement=1.0)
    model = BenchmarkModel(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), bounds=(0, 1), num_classes=10
    ).eval()
    return dataset, guide, judge, model


def test_l0_candidates_are_chosen_by_the_guide_and_labelled_by_the_judge(tmp_path):
    dataset, guide, judge, model = _blob_search(tmp_path)
    images, labels = dataset.evaluation_subset(1)
    context = InvarianceContext(dataset, judge, torch.arange(1))
    guided = create_attack("invariance-l0", copies=0, guide=str(guide))(
        model, images, labels, norm="l0", epsilons=(25.0,), context=context
    )
    assert torch.equal(guided.candidates[0, 0], _blob_image(_BLOB_A)), "the guide's choice: blob A"
    assert guided.target_classes.tolist() == [[1]] and guided.options["guide"] == str(guide)
    assert guided.oracle == "proxy:judge" and guided.oracle_labels.tolist() == [[0]], (
        "the judge reads blob A as the original digit"
    )
    # The former search chose by its judge: blob B, which the judge then reads as changed.
    former = create_attack("invariance-l0-judge-guided", copies=0)(
        model, images, labels, norm="l0", epsilons=(25.0,), context=context
    )
    assert torch.equal(former.candidates[0, 0], _blob_image(_BLOB_B)) and former.oracle_labels.tolist() == [[1]]
    assert "guide" not in former.options


def test_a_guide_that_is_the_judge_is_refused(tmp_path):
    dataset, guide, judge, model = _blob_search(tmp_path)
    images, labels = dataset.evaluation_subset(1)
    context = InvarianceContext(dataset, judge, torch.arange(1))
    with pytest.raises(
        ConfigError,
        match=(
            r"invariance-l0 guide=proxy:judge: proxy:judge is the oracle that judges this run; .*pass"
            r" invariance-l0:guide=MODEL with a model that is neither the judge nor one of its members"
        ),
    ):
        create_attack("invariance-l0", copies=0, guide="proxy:judge")(
            model, images, labels, norm="l0", epsilons=(25.0,), context=context
        )
    # A member of the judge, known by its checkpoint's sha256 whatever the guide is called.
    judge.member_checkpoints = {"judge-member": sha256_file(guide)}
    with pytest.raises(
        ConfigError,
        match=r"guide=.*guide-prefers-a\.pt is judge-member, a member of proxy:judge, the oracle that judges this run",
    ):
        create_attack("invariance-l0", copies=0, guide=f"mnist-cnn-standard+{guide}")(
            model, images, labels, norm="l0", epsilons=(25.0,), context=context
        )
    with pytest.raises(
        ConfigError, match="spheres-mlp-standard is a model of spheres with 2 classes; the data set searched is blobs"
    ):
        create_attack("invariance-l0", copies=0, guide="spheres-mlp-standard")(
            model, images, labels, norm="l0", epsilons=(25.0,), context=context
        )


def test_a_run_guided_by_a_member_of_its_judge_is_refused_before_anything_is_written(tmp_path):
    config = RunConfig(
        (ModelSpec("mnist-cnn-standard", "mnist"),),
        (ThreatModel("linf", (0.3,)),),
        (AttackSpec.parse("invariance-l0:guide=oracle-mnist-reader-0"),),
        n=10,
    )
    with pytest.raises(
        ConfigError,
        match=(
            "oracle-mnist-reader-0 is oracle-mnist-reader-0, a member of proxy:mnist-readers, the oracle that judges"
            " this run"
        ),
    ):
        run_benchmark(config, tmp_path, name="run", progress=False)
    assert not any(tmp_path.iterdir())


def test_runs_record_the_guide_and_entries_without_one_are_checked_with_the_former_search():
    config = RunConfig(
        (ModelSpec("mnist-cnn-standard", "mnist"),),
        (ThreatModel("linf", (0.3,)),),
        (
            AttackSpec("invariance-l0"),
            AttackSpec.parse("invariance-l0:guide=mnist-cnn-pgd-linf-0.1+mnist-cnn-pgd-l2-2.0"),
        ),
    )
    assert config.to_dict()["attacks"] == [
        {"name": "invariance-l0", "options": {}, "guide": "mnist-cnn-standard"},
        {
            "name": "invariance-l0",
            "options": {"guide": ["mnist-cnn-pgd-linf-0.1", "mnist-cnn-pgd-l2-2.0"]},
            "guide": "mnist-cnn-pgd-linf-0.1+mnist-cnn-pgd-l2-2.0",
        },
    ]
    assert rerun_as({"name": "invariance-l0", "options": {}}) == "invariance-l0-judge-guided"
    assert rerun_as({"name": "invariance-l0", "options": {}, "guide": "mnist-cnn-standard"}) == "invariance-l0"
    # An entry is re-run with the guide it records, whatever today's default.
    entry = {
        "model": "mnist-cnn-standard",
        "reference": "mnist-cnn-standard",
        "dataset": "mnist",
        "settings": {
            **config.to_dict(),
            "attacks": [
                {"name": "invariance-l0", "options": {"pixels": 20}, "guide": "mnist-cnn-pgd-linf-0.1"},
                {"name": "invariance-l0", "options": {}},
            ],
        },
    }
    assert entry_config(entry, 100).attacks == (
        AttackSpec("invariance-l0", (("pixels", 20), ("guide", "mnist-cnn-pgd-linf-0.1"))),
        AttackSpec("invariance-l0", (), runs_as="invariance-l0-judge-guided"),
    )
    # ... and `invarbench check` says which of its searches chose by the judge.
    assert (
        len(judge_guided_warnings(entry)) == 1
        and "re-checked with it (invariance-l0-judge-guided)" in judge_guided_warnings(entry)[0]
    )


def test_runner_runs_invariance_attacks_and_resumes(tmp_path):
    config = RunConfig(
        (ModelSpec("spheres-mlp-pgd-linf", "spheres"),),
        (ThreatModel("linf", (0.02, 0.025)),),
        (AttackSpec("pgd", (("steps", 5),)), AttackSpec("invariance-linf")),
        n=40,
        shard_size=20,
    )
    outcome = run_benchmark(config, tmp_path, name="run", progress=False)
    run_dir = tmp_path / "run"
    records = pd.read_parquet(run_dir / "invariance.parquet")
    assert len(records) == 40 * 2 and set(records["oracle"]) == {"exact:spheres"}
    assert len(list((run_dir / "candidates").glob("*.npz"))) == 2
    candidates = np.load(sorted((run_dir / "candidates").glob("*.npz"))[0])["candidates"]
    assert candidates.shape == (2, 20, 50)
    metrics = outcome.summary["models"]["spheres-mlp-pgd-linf"]["invariance"]["invariance-linf"]["linf:0.025"]
    changed = records[(records["eps"] == 0.025) & (records["oracle_label"] != records["label"])]
    assert metrics["label_changed"] == len(changed) > 0
    assert metrics["model_keeps_original_label"] == int((changed["model_prediction"] == changed["label"]).sum())
    assert "pgd:steps=5" in outcome.summary["models"]["spheres-mlp-pgd-linf"]["threats"]["linf"]["0.025"]["attacks"]
    again = run_benchmark(config, tmp_path, name="run", progress=False)
    assert again.jobs_run == 0 and again.summary == outcome.summary


def test_margin_is_positive_exactly_where_the_label_changes():
    points = torch.randn(100, 5)
    labels = torch.randint(0, 2, (100,))
    assert torch.equal(spheres_margin(points, labels) > 0, spheres_label(points) != labels)


def test_cli_evaluates_a_fixed_invariance_set(tmp_path, mnist, capsys):
    from invarbench.cli import main

    indices = np.array([0, 2, 5, 9])
    images = mnist.test_images[indices, 0].numpy()
    # People's labels: two kept (as the test labels), two "changed" to another digit.
    labels = mnist.test_labels[indices].numpy().copy()
    labels[[1, 3]] = (labels[[1, 3]] + 1) % 10
    _write_set(
        tmp_path / "set" / "linf", "automated_eps03", (images * 255).round().astype(np.uint8), labels.astype(np.int64)
    )
    np.save(tmp_path / "set" / "indexs.npy", indices)
    code = main(
        [
            "run",
            "mnist-cnn-standard",
            "--invariance-set",
            str(tmp_path / "set"),
            "--out",
            str(tmp_path / "runs"),
            "--name",
            "r",
            "--no-progress",
        ]
    )
    assert code == 0
    output = capsys.readouterr().out
    assert "label-file:linf/automated_eps03" in output
    records = pd.read_parquet(tmp_path / "runs" / "r" / "invariance.parquet")
    assert len(records) == 10 and records["ran"].sum() == 4, (
        "n defaults to the largest index + 1; only the set's points are judged"
    )
    judged = records[records["ran"]]
    assert judged["oracle_label"].tolist() == labels.tolist()
    model = load_model("mnist-cnn-standard")
    with torch.no_grad():
        expected = model(torch.from_numpy((images * 255).round() / 255).float().unsqueeze(1)).argmax(1)
    assert judged["model_prediction"].tolist() == expected.tolist()


def test_zoo_fi_revnets_invert_exactly_and_oracle_members_are_not_ranked(mnist):
    from invarbench.models import get_card, list_models

    images, _ = mnist.evaluation_subset(16)
    for name in ("mnist-firevnet-ce", "mnist-firevnet-ice"):
        model = load_model(name)
        assert model.invertible and get_card(name).invertible
        with torch.no_grad():
            z, _ = model.encode(images)
            assert torch.equal(model(images), z[:, :10])
            assert (model.decode(z) - images).abs().max() < 1e-2, (
                "float32: the trained couplings amplify rounding (about 2e-4 measured)"
            )
            exact = model.double()
            assert (exact.decode(exact.encode(images.double())[0]) - images.double()).abs().max() < 1e-4, (
                "exact inverse (float64, as metamers are computed)"
            )
    members = list_models(role="oracle")
    assert members and not set(members) & set(list_models())
    assert all(get_card(name).role == "oracle" for name in members)


def test_ice_objective_trains_the_nuisance_classifier_and_penalises_label_information():
    from invarbench.training import IndependenceCrossEntropy

    torch.manual_seed(0)
    network = build_architecture("fi-revnet", blocks=(1, 1), hidden=(8, 8), dense_blocks=1, dense_hidden=32)
    model = BenchmarkModel(network, bounds=(0, 1), num_classes=10)
    objective = IndependenceCrossEntropy(
        model, num_classes=10, nuisance_weight=1.0, likelihood_weight=0.1, hidden=32, learning_rate=1e-2
    )
    images, labels = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    before = [parameter.clone() for parameter in objective.nuisance_classifier.parameters()]
    loss, logits = objective(images, labels, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and logits.shape == (32, 10)
    assert any(not torch.equal(old, new) for old, new in zip(before, objective.nuisance_classifier.parameters())), (
        "the nuisance classifier took its own step"
    )
    loss.backward()
    assert any(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in network.parameters()), (
        "the network gets the iCE gradient"
    )
    ramped, _ = objective(images, labels, torch.Generator().manual_seed(0), ramp=0.0)
    plain = torch.nn.functional.cross_entropy(model(images), labels)
    assert abs(ramped.item() - plain.item()) < 0.05, (
        "with the ramp at 0 only the cross-entropy remains (up to dequantisation noise)"
    )


def test_ice_uniform_objective_leaves_no_way_out_through_a_confidently_wrong_nuisance_classifier():
    from invarbench.training import IndependenceCrossEntropy, nuisance_penalty

    labels = torch.arange(10).repeat(2)
    wrong = torch.full((20, 10), -20.0)
    wrong[torch.arange(20), (labels + 1) % 10] = 20.0  # always the next class: as informative as the label
    uniform = torch.zeros(20, 10)
    log_c = math.log(10)
    assert abs(nuisance_penalty(uniform, labels, "uniform").item() - log_c) < 1e-6
    assert nuisance_penalty(wrong, labels, "uniform").item() > 10, (
        "the uniform form penalises a confidently wrong prediction"
    )
    assert abs(nuisance_penalty(wrong, labels, "capped-ce").item() + log_c) < 1e-6, (
        "the capped form rewards it as much as chance"
    )
    assert abs(nuisance_penalty(uniform, labels, "capped-ce").item() + log_c) < 1e-6
    with pytest.raises(ValueError, match="nuisance objective 'entropy'"):
        nuisance_penalty(uniform, labels, "entropy")

    torch.manual_seed(0)
    network = build_architecture("fi-revnet", blocks=(1, 1), hidden=(8, 8), dense_blocks=1, dense_hidden=32)
    model = BenchmarkModel(network, bounds=(0, 1), num_classes=10)
    ice = IndependenceCrossEntropy(
        model,
        num_classes=10,
        nuisance_weight=1.0,
        likelihood_weight=0.0,
        hidden=8,
        learning_rate=1e-2,
        objective="uniform",
        steps=3,
    )
    images = torch.rand(20, 1, 28, 28)
    loss, _ = ice(images, labels, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and 0.0 <= ice.nuisance_accuracy <= 1.0
    with pytest.raises(ValueError, match="steps must be >= 1"):
        IndependenceCrossEntropy(
            model, num_classes=10, nuisance_weight=1.0, likelihood_weight=0.0, hidden=8, learning_rate=0.0, steps=0
        )


def test_planning_gives_invariance_attacks_their_own_threats():
    from invarbench.plan import attack_threats

    threats = (ThreatModel("linf", (0.3, 0.4)), ThreatModel("l2", (2.0,)))
    assert attack_threats(AttackSpec("pgd"), threats, False) == list(threats)
    assert attack_threats(AttackSpec("invariance-linf"), threats, False) == [threats[0]]
    assert attack_threats(AttackSpec("metameric"), threats, True) == [ThreatModel("metamer", (0.0,))], (
        "exact metamers: one job whatever the balls"
    )
    assert attack_threats(AttackSpec("metameric"), threats, False) == list(threats), "gradient metamers in each ball"
    assert attack_threats(AttackSpec("invariance-l0", (("pixels", 12),)), threats, False) == [
        ThreatModel("l0", (12.0,))
    ]


def test_gallery_draws_a_run_and_is_reproducible(tmp_path):
    from invarbench.gallery import invariance_gallery

    config = RunConfig(
        (ModelSpec("spheres-mlp-pgd-linf", "spheres"),),
        (ThreatModel("linf", (0.025,)),),
        (AttackSpec("invariance-linf"),),
        n=60,
        shard_size=30,
    )
    run_benchmark(config, tmp_path, name="run", progress=False)
    first = invariance_gallery(tmp_path / "run", tmp_path / "a.png", count=3)
    second = invariance_gallery(tmp_path / "run", tmp_path / "b.png", count=3)
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and first.read_bytes() == second.read_bytes()
    with pytest.raises(ConfigError, match="no invariance records"):
        invariance_gallery(tmp_path / "run", tmp_path / "c.png", attack="metameric")


@pytest.mark.mnist
def test_a_card_with_an_unknown_nuisance_objective_is_refused_naming_the_card(tmp_path):
    from dataclasses import replace

    from invarbench.models.registry import get_card
    from invarbench.training import train

    card = get_card("mnist-firevnet-ice")
    training = {**card.training, "nuisance_objective": "entropy", "epochs": 0}
    with pytest.raises(ConfigError, match=r"bad\.toml: \[training\] nuisance objective 'entropy'"):
        train(
            replace(card, training=training, path=tmp_path / "bad.toml", checkpoint_file=str(tmp_path / "bad.pt")),
            progress=False,
        )
    assert not (tmp_path / "bad.pt").exists() and not (tmp_path / "bad.toml").exists(), "nothing written"
