import tomllib
from pathlib import Path

import pytest
import torch

from invarbench.datasets import load_dataset
from invarbench.errors import ModelError
from invarbench.evaluation import clean_accuracy
from invarbench.io import sha256_file
from invarbench.models import BenchmarkModel, build_architecture, get_card, list_models, load_model, registry
from invarbench.training import pgd_training_examples, train

ZOO_CHECKPOINTS = registry.CHECKPOINTS_DIR

ZOO = [
    "mnist-cnn-pgd-l2-2.0",
    "mnist-cnn-pgd-linf-0.3",
    "mnist-cnn-pgd-linf-0.4",
    "mnist-cnn-standard",
    "spheres-mlp-pgd-linf",
    "spheres-mlp-standard",
]


def test_registry_lists_the_zoo():
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize("name", ZOO)
def test_zoo_checkpoint_is_small_and_matches_its_card(name):
    card = get_card(name)
    assert card.checkpoint_path.stat().st_size <= 2_000_000
    assert sha256_file(card.checkpoint_path) == card.checkpoint_sha256


@pytest.mark.parametrize("name", ZOO)
def test_load_model_reproduces_card_clean_accuracy(name, request):
    card = get_card(name)
    dataset = (
        request.getfixturevalue("mnist")
        if card.dataset == "mnist"
        else load_dataset(card.dataset, **card.dataset_options)
    )
    model = load_model(name)
    assert isinstance(model, BenchmarkModel) and not model.training
    assert model.bounds == card.bounds and model.num_classes == card.num_classes
    images, labels = dataset.evaluation_subset(card.clean_accuracy_n)
    assert abs(clean_accuracy(model, images, labels) - card.clean_accuracy) <= 0.001


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ModelError, match="Did you mean mnist-cnn-standard"):
        load_model("mnist-cnn-standart")


def test_checkpoint_path_that_does_not_exist(tmp_path):
    with pytest.raises(ModelError, match="unknown model .*checkpoint path must point to an existing file"):
        load_model(tmp_path / "missing.pt", architecture="mlp")


def test_missing_registered_checkpoint_names_the_fix(isolated_registry, monkeypatch):
    monkeypatch.delenv(registry.CHECKPOINTS_ENV, raising=False)
    isolated_registry("spheres-mlp-standard", with_checkpoint=False)
    with pytest.raises(
        ModelError,
        match=(
            f"is in none of .*set {registry.CHECKPOINTS_ENV} to a folder holding them.*run `invarbench models train"
            " spheres-mlp-standard`"
        ),
    ):
        load_model("spheres-mlp-standard")


def test_retired_checkpoint_says_why_and_how_to_train_it_again(monkeypatch):
    """The round-1 ensemble's members keep their cards (and recipes) but not their weights."""
    monkeypatch.delenv(registry.CHECKPOINTS_ENV, raising=False)
    card = get_card("oracle-mnist-cnn-wide")
    assert card.checkpoint_retired and not card.checkpoint_path.exists()
    assert tomllib.loads(card.to_toml())["checkpoint"]["retired"] == card.checkpoint_retired
    with pytest.raises(
        ModelError,
        match="Not kept in the repository.*`invarbench models train oracle-mnist-cnn-wide`.*set INVARBENCH_CHECKPOINTS",
    ):
        load_model("oracle-mnist-cnn-wide")


def test_checkpoints_are_found_in_the_folder_the_environment_names(isolated_registry, tmp_path, monkeypatch):
    """As after installing the wheel, which leaves the zoo's weights out: the package's folder lacks them."""
    _, checkpoint = isolated_registry("spheres-mlp-standard")
    elsewhere = tmp_path / "zoo"
    elsewhere.mkdir()
    checkpoint.rename(elsewhere / checkpoint.name)
    monkeypatch.setenv(registry.CHECKPOINTS_ENV, str(elsewhere))
    assert get_card("spheres-mlp-standard").checkpoint_path == elsewhere / checkpoint.name
    card = get_card("spheres-mlp-standard")
    assert load_model("spheres-mlp-standard")(torch.zeros(1, *card.input_shape)).shape == (1, card.num_classes)


def test_the_wheel_leaves_the_checkpoints_out():
    setuptools = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not any(pattern.endswith(".pt") for patterns in setuptools["package-data"].values() for pattern in patterns)
    assert "checkpoints/*.pt" in setuptools["exclude-package-data"]["invarbench.models"]


def test_corrupted_checkpoint_is_refused(isolated_registry):
    _, checkpoint = isolated_registry("spheres-mlp-standard")
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 .* but card .* records"):
        load_model("spheres-mlp-standard")
    checkpoint.write_bytes(b"definitely not a zip archive")
    with pytest.raises(ModelError, match="is not a PyTorch checkpoint"):
        load_model("spheres-mlp-standard", verify_checksum=False)


def test_card_with_missing_fields_is_refused(isolated_registry):
    card_path, _ = isolated_registry("spheres-mlp-standard")
    card_path.write_text(card_path.read_text().replace("[clean_accuracy]", "[accuracy]"))
    with pytest.raises(ModelError, match="lacks value, n in \\[clean_accuracy\\]"):
        get_card("spheres-mlp-standard")


def test_user_state_dict_with_registered_architecture(tmp_path):
    network = build_architecture("mlp", input_dim=64, hidden=[32], num_classes=10)
    path = tmp_path / "digits.pt"
    torch.save(network.state_dict(), path)
    model = load_model(path, architecture="mlp", architecture_args={"input_dim": 64, "hidden": [32]}, num_classes=10)
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(model(x), network(x))
    assert model.num_classes == 10 and not model.training


def test_state_dict_that_does_not_fit_names_the_keys(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(build_architecture("mlp", input_dim=64, hidden=[32], num_classes=10).state_dict(), path)
    with pytest.raises(ModelError, match="shape mismatches .*layers.1.weight \\(32, 64\\) vs \\(16, 64\\)"):
        load_model(path, architecture="mlp", architecture_args={"input_dim": 64, "hidden": [16], "num_classes": 10})
    with pytest.raises(ModelError, match="missing keys .*layers.5"):
        load_model(path, architecture="mlp", architecture_args={"input_dim": 64, "hidden": [32, 32], "num_classes": 10})


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(ModelError, match="notes.pt is not a PyTorch checkpoint"):
        load_model(path, architecture="mlp", architecture_args={"input_dim": 64})
    with pytest.raises(ModelError, match="notes.pt is not a TorchScript file"):
        load_model(path)
    torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(ModelError, match="not a state_dict of tensors"):
        load_model(path, architecture="mlp", architecture_args={"input_dim": 64})


def test_torchscript_checkpoint(tmp_path):
    network = build_architecture("mlp", input_dim=64, hidden=[16], num_classes=10).eval()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(network), str(path))
    model = load_model(path, num_classes=10)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(model(x), network(x))


def test_unknown_architecture_suggests():
    with pytest.raises(ModelError, match="Did you mean mnist-cnn"):
        build_architecture("mnist_cnn")


def test_wrapper_normalises_inside():
    network = torch.nn.Identity()
    model = BenchmarkModel(network, bounds=(0, 1), num_classes=3, mean=[0.5, 0.25, 0.0], std=[0.5, 0.5, 2.0])
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.5, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), expected)


def test_training_pgd_reaches_the_closed_form_optimum_on_a_linear_model():
    # logits = [0, w.x]: the loss-maximising l_inf perturbation for label 1 is -eps * sign(w),
    # and the l_2 one is -eps * w / ||w||; the optimum is interior when x is far from the bounds.
    torch.manual_seed(0)
    w = torch.randn(20)
    linear = torch.nn.Linear(20, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([torch.zeros(20), w]))
    x = torch.full((1, 20), 0.5)
    y = torch.ones(1, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    linf = pgd_training_examples(
        linear, x, y, norm="linf", eps=0.1, steps=20, step_size=0.05, bounds=(0, 1), generator=generator
    )
    torch.testing.assert_close(linf - x, -0.1 * w.sign().unsqueeze(0))
    l2 = pgd_training_examples(
        linear, x, y, norm="l2", eps=0.5, steps=50, step_size=0.1, bounds=(0, 1), generator=generator
    )
    torch.testing.assert_close(l2 - x, -0.5 * (w / w.norm()).unsqueeze(0), atol=1e-4, rtol=0)


DIGITS_CARD = """
name = "digits-mlp-test"
dataset = "digits"
num_classes = 10
invertible = false
notes = "test card"

[architecture]
name = "mlp"
args = {{ input_dim = 64, hidden = [32], num_classes = 10 }}

[input]
shape = [1, 8, 8]
bounds = [0.0, 1.0]
mean = [0.0]
std = [1.0]

[training]
recipe = "{recipe}"
seed = 1
threads = 1
epochs = 2
batch_size = 64
learning_rate = 0.01
pgd_steps = 3
pgd_step_size = 0.05
eps_warmup_epochs = 1

[threat_model]
norm = "{norm}"
eps = 0.1

[checkpoint]
file = "digits-mlp-test.pt"
sha256 = ""

[clean_accuracy]
value = 0.0
n = 200
"""


@pytest.mark.parametrize("recipe,norm", [("standard", "none"), ("pgd", "linf"), ("pgd", "l2")])
def test_training_is_deterministic_and_updates_the_card(isolated_registry, recipe, norm):
    card_path = registry.CARDS_DIR / "digits-mlp-test.toml"
    card_path.write_text(DIGITS_CARD.format(recipe=recipe, norm=norm))
    first = train(get_card("digits-mlp-test"), progress=False)
    updated = get_card("digits-mlp-test")
    assert updated.checkpoint_sha256 == first.card.checkpoint_sha256 == sha256_file(updated.checkpoint_path)
    assert updated.clean_accuracy == pytest.approx(first.clean_accuracy, abs=1e-6) and first.clean_accuracy > 0.6
    second = train(updated, progress=False)
    assert second.card.checkpoint_sha256 == first.card.checkpoint_sha256
    model = load_model("digits-mlp-test")
    images, labels = load_dataset("digits").evaluation_subset(200)
    assert clean_accuracy(model, images, labels) == pytest.approx(first.clean_accuracy, abs=1e-6)


@pytest.mark.slow
def test_zoo_training_reproduces_the_committed_checkpoint(isolated_registry):
    """`invarbench models train` on a zoo card gives back the committed checkpoint.

    Byte for byte where the CPU kernels are those it was trained with (training is deterministic for a
    seed: see the test above); on another CPU (AVX-512 instead of AVX2 kernels, say) float rounding
    differs and ten epochs amplify it, so there every weight must stay within 2% of its tensor's scale
    and the clean accuracy must be the card's.
    """
    card_path, checkpoint = isolated_registry("spheres-mlp-standard", with_checkpoint=False)
    card = get_card("spheres-mlp-standard")
    report = train(card, progress=False)
    assert report.card.checkpoint_sha256 == sha256_file(checkpoint)
    if report.card.checkpoint_sha256 == card.checkpoint_sha256:
        return
    committed = torch.load(ZOO_CHECKPOINTS / "spheres-mlp-standard.pt", map_location="cpu")
    retrained = torch.load(checkpoint, map_location="cpu")
    assert committed.keys() == retrained.keys()
    for key, tensor in committed.items():
        scale = tensor.float().abs().max().item()
        assert (tensor.float() - retrained[key].float()).abs().max().item() <= 0.02 * scale, key
    assert report.clean_accuracy == pytest.approx(card.clean_accuracy, abs=1e-6)


def test_unknown_recipe(isolated_registry):
    (registry.CARDS_DIR / "digits-mlp-test.toml").write_text(DIGITS_CARD.format(recipe="trades", norm="linf"))
    with pytest.raises(Exception, match="unknown training recipe 'trades'"):
        train(get_card("digits-mlp-test"), progress=False)


def test_firevnet_checkpoints_leave_out_the_permutations_the_seed_rebuilds():
    arguments = {"blocks": [1, 1], "hidden": [8, 8], "dense_blocks": 1, "dense_hidden": 16}
    network = build_architecture("fi-revnet", **arguments)
    state = network.state_dict()
    assert not [key for key in state if key.endswith(("w_perm", "w_perm_inv"))]
    # A state_dict saved with them (before they were left out) loads when they are the seed's ...
    permutations = {
        key: tensor.clone() for key, tensor in network.named_buffers() if key.endswith(("w_perm", "w_perm_inv"))
    }
    assert permutations
    again = build_architecture("fi-revnet", **arguments)
    again.load_state_dict({**state, **permutations})
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again(x), network(x)) and torch.allclose(network.decode(network.encode(x)[0]), x, atol=1e-5)
    # ... and is refused when they are another seed's.
    other = {
        key: tensor.clone()
        for key, tensor in build_architecture("fi-revnet", **arguments, permutation_seed=1).named_buffers()
        if key in permutations
    }
    with pytest.raises(RuntimeError, match="permutation_seed"):
        again.load_state_dict({**state, **other})
