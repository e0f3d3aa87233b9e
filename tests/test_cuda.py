"""The CUDA path, against the CPU's: run by `make device-check` (benchmarks/device_check.sh) on a lent GPU
machine, skipped everywhere else (CI has no GPU). Each test compares what CUDA gives with what the CPU
gives, or with the CPU-made records stored in leaderboard/entries/."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from invarbench.attacks import ThreatModel, create_attack
from invarbench.config import AttackSpec, ModelSpec, RunConfig
from invarbench.environment import resolve_device
from invarbench.evaluation import logits, same_logits
from invarbench.leaderboard.check import check_entries
from invarbench.models import get_card, list_models, load_model
from invarbench.oracles import load_oracle
from invarbench.runner import run_benchmark

#: The device compared with the CPU: cuda, or cpu for a rehearsal of these tests on a machine without a
#: GPU (``make device-check`` with --dry-run sets INVARBENCH_CUDA_TESTS_ON=cpu, so that device minutes
#: are not spent on a broken test).
DEVICE = os.environ.get("INVARBENCH_CUDA_TESTS_ON", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA device (make device-check runs these on a lent GPU machine)",
    ),
]

ENTRIES = Path(__file__).resolve().parents[1] / "leaderboard" / "entries"
MNIST_ZOO = [name for name in list_models() if get_card(name).dataset == "mnist"]
#: Pixels whose input gradient is at least this share of the image's largest count in the sign comparison.
GRADIENT_TOLERANCE = 1e-3
#: Points of a run whose outcome may differ between devices (float rounding near a decision boundary).
FLIP_TOLERANCE = 0.04


@pytest.fixture(scope="module")
def cuda():
    return resolve_device(DEVICE)


def _input_gradients(model, images, labels):
    images = images.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(images), labels, reduction="sum")
    return torch.autograd.grad(loss, images)[0]


@pytest.mark.parametrize("name", [*MNIST_ZOO, "oracle-mnist-reader-0", "oracle-mnist-reader-2"])
def test_logits_and_input_gradients_on_cuda_equal_the_cpus(name, mnist, cuda):
    assert DEVICE == "cpu" or not torch.backends.cudnn.allow_tf32, "resolve_device('cuda') computes in full float32"
    images, labels = mnist.evaluation_subset(256)
    on_cpu, on_gpu = load_model(name), load_model(name).to(cuda)
    assert same_logits(logits(on_gpu, images), logits(on_cpu, images)), name
    expected = _input_gradients(on_cpu, images, labels).flatten(1)
    got = _input_gradients(on_gpu, images.to(cuda), labels.to(cuda)).cpu().flatten(1)
    # Not element by element: on the H200, single pixels differed by up to 12% of the largest gradient for
    # 4 of 9 models while the logits agreed within 1e-4, most likely max-pooling windows of equal values (a
    # convolution's bias over blank background) routing the gradient to another pixel. What attacks use is compared:
    # each image's gradient direction (l_2 steps) and the signs of its non-negligible pixels (l_inf steps).
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=1)
    large = expected.abs() > GRADIENT_TOLERANCE * expected.abs().amax(dim=1, keepdim=True)
    signs = (got.sign() == expected.sign())[large].float().mean()
    assert cosine.min() >= 0.99 and signs >= 0.99, (
        f"{name}: smallest cosine {cosine.min():.4f}, sign agreement {signs:.4f} on {int(large.sum())} pixels, largest"
        f" difference {(got - expected).abs().max():.3g} of {expected.abs().max():.3g}"
    )


@pytest.mark.parametrize("attack, options", [("pgd", {}), ("fmn", {"steps": 50})])
def test_pgd_and_fmn_on_cuda_give_the_cpus_outcomes_and_examples_the_cpu_confirms(attack, options, mnist, cuda):
    images, labels = mnist.evaluation_subset(100)
    threat = ThreatModel("linf", (0.1, 0.3))
    results = {}
    for device in ("cpu", DEVICE):
        model = load_model("mnist-cnn-pgd-linf-0.3").to(device)
        results[device] = create_attack(attack, **options)(
            model, images, labels, norm=threat.norm, epsilons=threat.epsilons, seed=0
        )
    flips = (results["cpu"].success != results[DEVICE].success).float().mean(dim=1)
    assert (flips <= FLIP_TOLERANCE).all(), (
        f"{attack}: outcomes differ on {flips.tolist()} of the points at eps {threat.epsilons}"
    )
    gpu = results[DEVICE]
    assert (
        gpu.norms[gpu.success] <= torch.tensor(threat.epsilons).view(-1, 1).expand_as(gpu.norms)[gpu.success] + 1e-5
    ).all()
    if gpu.adversarials is not None:
        cpu_model = load_model("mnist-cnn-pgd-linf-0.3")
        for e, eps in enumerate(threat.epsilons):
            # Examples CUDA found clearly (margin beyond float noise) are misclassified by the CPU's model too.
            clear = gpu.success[e] & (gpu.margins[e] < -1e-3) & (gpu.norms[e] > 0)
            if clear.any():
                examples = gpu.adversarials[e][clear]
                assert ((examples - images[clear]).abs().flatten(1).max(1).values <= eps + 1e-5).all()
                assert (logits(cpu_model, examples).argmax(1) != labels[clear]).all(), f"{attack} eps {eps}"


def test_aa_fast_and_autoattack_on_cuda_break_every_point_the_stored_autoattack_broke(mnist, cuda):
    """The stored entry of mnist-cnn-pgd-linf-0.3 holds the official AutoAttack's per-point outcomes at
    l_inf 0.3, made on a CPU: on CUDA, both attacks break each point it broke."""
    stored = pd.read_parquet(ENTRIES / "mnist-cnn-pgd-linf-0.3__mnist__perturbation.parquet")
    points = 50
    reference = stored[
        (stored["attack"] == "autoattack")
        & (stored["norm"] == "linf")
        & (stored["eps"] == 0.3)
        & (stored["index"] < points)
    ]
    broken = set(reference[reference["ran"] & reference["success"].fillna(False).astype(bool)]["index"])
    images, labels = mnist.evaluation_subset(points)
    model = load_model("mnist-cnn-pgd-linf-0.3").to(cuda)
    for name, options in (("aa-fast", {}), ("autoattack", {"version": "standard"})):
        result = create_attack(name, **options)(model, images, labels, norm="linf", epsilons=(0.3,), seed=0)
        missed = broken - set(result.success[0].nonzero().flatten().tolist())
        assert not missed, f"{name} on CUDA missed points {sorted(missed)} that the stored AutoAttack broke"


def test_proxy_oracle_on_cuda_votes_as_on_the_cpu(mnist, cuda):
    images, _ = mnist.evaluation_subset(500)
    # Candidates are changed images: the test images darkened and shifted as well as they are.
    shifted = torch.roll(images, shifts=3, dims=3) * 0.7
    batch = torch.cat([images, shifted])
    on_cpu = load_oracle("proxy:mnist-readers", mnist)
    expected_votes, expected_labels = on_cpu.votes(batch), on_cpu.label(batch)
    on_gpu = load_oracle("proxy:mnist-readers", mnist).to(cuda)
    assert on_gpu.device == cuda
    votes, labels = on_gpu.votes(batch), on_gpu.label(batch)
    assert votes.device.type == "cpu" and labels.device.type == "cpu"
    assert (votes != expected_votes).float().mean() <= 0.002 and (labels != expected_labels).float().mean() <= 0.002


def test_a_run_on_cuda_gives_the_cpus_outcomes(tmp_path, mnist, cuda):
    """The same run (every attack kind: gradient, minimum-norm, AutoAttack, the invariance searches judged
    by the default oracle) on the CPU and on CUDA: per-point outcomes agree but for float rounding."""
    attacks = (
        "fgsm",
        "pgd:steps=20",
        "fmn:steps=20",
        "autoattack:version=custom,attacks=apgd-ce+square",
        "invariance-linf",
        "invariance-l0",
        "metameric:steps=20",
    )
    config = RunConfig(
        (ModelSpec("mnist-cnn-standard", "mnist"),),
        (ThreatModel("linf", (0.1, 0.3)),),
        tuple(AttackSpec.parse(spec) for spec in attacks),
        n=20,
        shard_size=20,
    )
    on_gpu = run_benchmark(config, tmp_path, name="cuda", device=DEVICE, progress=False)
    on_cpu = run_benchmark(config, tmp_path, name="cpu", device="cpu", progress=False)
    assert json.loads((tmp_path / "cuda" / "manifest.json").read_text())["device"].startswith(DEVICE)
    assert (
        on_gpu.summary["models"]["mnist-cnn-standard"]["clean_correct"]
        == on_cpu.summary["models"]["mnist-cnn-standard"]["clean_correct"]
    )
    keys = ["attack", "norm", "eps", "index"]
    perturbation = pd.read_parquet(tmp_path / "cpu" / "results.parquet").merge(
        pd.read_parquet(tmp_path / "cuda" / "results.parquet"), on=keys, suffixes=("_cpu", "_cuda")
    )
    for (attack, eps), group in perturbation.groupby(["attack", "eps"]):
        flips = (group["success_cpu"].fillna(False) != group["success_cuda"].fillna(False)).mean()
        assert flips <= FLIP_TOLERANCE, f"{attack} eps {eps}: outcomes differ on {flips:.0%} of the points"
    invariance = pd.read_parquet(tmp_path / "cpu" / "invariance.parquet").merge(
        pd.read_parquet(tmp_path / "cuda" / "invariance.parquet"), on=keys, suffixes=("_cpu", "_cuda")
    )
    assert len(invariance) and set(invariance["attack"]) == {"invariance-linf", "invariance-l0", "metameric"}
    searched = invariance[invariance["attack"] == "invariance-linf"]
    # The l_inf search picks training images by pixel distance, which no model computes: the same on both.
    assert (searched["target_class_cpu"] == searched["target_class_cuda"]).all() and (
        searched["source_index_cpu"] == searched["source_index_cuda"]
    ).all()
    for attack, group in invariance.groupby("attack"):
        agree = (group["oracle_label_cpu"] == group["oracle_label_cuda"]).mean()
        assert agree >= 1 - FLIP_TOLERANCE, f"{attack}: the oracle's labels agree on {agree:.0%} of the candidates"


def test_stored_cpu_entries_pass_their_check_on_cuda(cuda):
    """`invarbench check --device cuda` on CPU-made entries: a perturbation entry (PGD, FMN, AutoAttack) and
    the exact metamers of an invertible model (its encoder and decoder on CUDA) reproduce."""
    names = ["mnist-cnn-standard__mnist__perturbation", "mnist-firevnet-ice__mnist__invariance"]
    results = check_entries(ENTRIES, names=names, points=100, device=DEVICE)
    assert len(results) == len(names)
    for result in results:
        assert result.passed, f"{result.entry}: {result.differences[:10]}"
        assert DEVICE == "cpu" or any("re-run on cuda" in warning for warning in result.warnings)
        print(f"{result.entry}: {len(result.borderline)} points flipped on {DEVICE}: {result.borderline[:20]}")


def test_a_checkpoint_trained_on_cuda_loads_on_the_cpu(isolated_registry, cuda):
    from invarbench.training import train

    isolated_registry("spheres-mlp-standard")
    card = get_card("spheres-mlp-standard")
    replace(card, training={**card.training, "epochs": 1}).save()
    report = train(get_card("spheres-mlp-standard"), device=DEVICE, progress=False, measure_robustness=False)
    assert report.card.training["device"] == DEVICE and report.clean_accuracy > 0.5
    # Without map_location, torch.load puts tensors back where they were saved: the file holds CPU tensors.
    state = torch.load(report.card.checkpoint_path, weights_only=True)
    assert all(tensor.device.type == "cpu" for tensor in state.values())
    points = torch.randn(64, *report.card.input_shape)
    assert same_logits(
        logits(load_model("spheres-mlp-standard").to(cuda), points), logits(load_model("spheres-mlp-standard"), points)
    )
