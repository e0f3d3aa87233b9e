"""Model formats and data sets users bring: ONNX files, RobustBench zoo names, CIFAR-10, and CUDA runs."""

import json
import math

import pytest
import torch

from invarbench.checks import check_compatible
from invarbench.cli import main
from invarbench.config import HEADLINE_THREATS, ModelSpec, default_threats
from invarbench.datasets import load_dataset
from invarbench.errors import ConfigError, ModelError
from invarbench.io import sha256_file
from invarbench.models import BenchmarkModel, external, load_model

CIFAR_LINF = 8 / 255


def small_cnn(channels: int, size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 6, 5, stride=2),
        torch.nn.ReLU(),
        torch.nn.BatchNorm2d(6),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * ((size - 5) // 2 + 1) ** 2, 10),
    ).eval()


def export_onnx(network: torch.nn.Module, path, shape) -> None:
    torch.onnx.export(
        network,
        (torch.rand(2, *shape),),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}},
    )


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------- ONNX


def test_onnx_model_converts_with_the_same_logits_and_gradients(tmp_path):
    network = small_cnn(1, 28)
    export_onnx(network, tmp_path / "cnn.onnx", (1, 28, 28))
    model = load_model(tmp_path / "cnn.onnx")
    assert model.input_shape == (1, 28, 28) and model.bounds == (0.0, 1.0) and not model.training
    x = torch.rand(7, 1, 28, 28, requires_grad=True)
    reference_x = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(model(x), network(reference_x), rtol=1e-5, atol=1e-5)
    torch.nn.functional.cross_entropy(model(x), torch.arange(7)).backward()
    torch.nn.functional.cross_entropy(network(reference_x), torch.arange(7)).backward()
    assert x.grad.abs().sum() > 0, "gradients must flow through the converted model"
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-4, atol=1e-6)


def test_bad_and_unsupported_onnx_files_are_refused(tmp_path, capsys, mnist):
    import onnx
    from onnx import TensorProto, helper

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not an onnx model at all\xff\xff")
    with pytest.raises(ModelError, match=r"garbage\.onnx is not .*ONNX model.*torch\.onnx\.export"):
        load_model(garbage)
    # Unique is a valid ONNX operator that onnx2torch has no converter for.
    graph = helper.make_graph(
        [helper.make_node("Unique", ["input"], ["values"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 28, 28])],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, [None])],
    )
    unsupported = tmp_path / "unique.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(unsupported))
    with pytest.raises(
        ModelError, match=r"unique\.onnx uses an operator that onnx2torch cannot convert.*Unique.*re-export"
    ):
        load_model(unsupported)
    for path in (garbage, unsupported):
        code, out, err = run_cli(
            capsys, "run", path, "--dataset", "mnist", "--n", 5, "--out", tmp_path / "runs", "--no-progress"
        )
        assert code == 1 and err.startswith("invarbench: error: ") and str(path) in err and "Traceback" not in err + out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), (
        "a refused model leaves nothing behind"
    )


def test_onnx_export_of_a_zoo_model_evaluated_from_the_cli(tmp_path, capsys, mnist):
    zoo = load_model("mnist-cnn-standard")
    export_onnx(zoo, tmp_path / "exported.onnx", (1, 28, 28))
    code, out, _ = run_cli(
        capsys,
        "run",
        tmp_path / "exported.onnx",
        "--dataset",
        "mnist",
        "--n",
        20,
        "--threat",
        "linf:0.1",
        "--attack",
        "pgd:steps=3",
        "--out",
        tmp_path,
        "--name",
        "onnx",
        "--no-progress",
    )
    assert code == 0 and "exported" in out
    summary = json.loads((tmp_path / "onnx" / "summary.json").read_text())["models"]["exported"]
    images, labels = mnist.evaluation_subset(20)
    assert summary["clean_correct"] == int((zoo(images).argmax(1) == labels).sum()), (
        "the ONNX copy classifies as the registered model"
    )
    assert summary["checkpoint_sha256"] == sha256_file(tmp_path / "exported.onnx") and not summary["warnings"]


# ---------------------------------------------------------------------------------------- RobustBench

ZOO_ENTRY = "robustbench:cifar10/Linf/Wong2020Fast"  # PreAct ResNet-18 with its own normalisation


@pytest.fixture
def robustbench_dir(tmp_path, monkeypatch):
    """A RobustBench model folder holding a random Wong2020Fast checkpoint written as RobustBench saves
    it (a state_dict under DIR/cifar10/Linf/NAME.pt); any download attempt fails the test."""
    zoo = external._zoo()  # imports robustbench
    import robustbench.utils

    def no_download(*args, **kwargs):
        raise AssertionError(f"robustbench tried to download {args}")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", no_download)
    monkeypatch.setattr(robustbench.utils, "download_gdrive", no_download)
    folder = tmp_path / "robustbench"
    monkeypatch.setenv(external.ROBUSTBENCH_DIR_ENV, str(folder))
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    network = zoo[BenchmarkDataset.cifar_10][ThreatModel.Linf]["Wong2020Fast"]["model"]()
    for module in network.modules():  # non-trivial batch-norm statistics, so a lost buffer would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = folder / "cifar10" / "Linf" / "Wong2020Fast.pt"
    path.parent.mkdir(parents=True)
    torch.save(network.state_dict(), path)
    return folder, network.eval(), path


def test_robustbench_entry_loads_from_the_model_folder_with_its_own_normalisation(robustbench_dir):
    folder, network, path = robustbench_dir
    model = load_model(ZOO_ENTRY)
    assert (
        isinstance(model, BenchmarkModel)
        and model.bounds == (0.0, 1.0)
        and model.num_classes == 10
        and model.input_shape == (3, 32, 32)
    )
    assert float(model.mean) == 0.0 and float(model.std) == 1.0, (
        "the zoo model normalises itself; invarbench must not normalise again"
    )
    assert torch.allclose(model.network.mu.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]), atol=1e-3), (
        "RobustBench's own CIFAR-10 normalisation is inside"
    )
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    with torch.no_grad():
        expected = network(x)
    torch.testing.assert_close(model(x), expected)
    model(x).sum().backward()
    assert x.grad.abs().sum() > 0
    assert external.robustbench_sha256(ZOO_ENTRY) == sha256_file(path)


def test_robustbench_names_refused_with_the_fix(robustbench_dir):
    folder, _, path = robustbench_dir
    expected = folder / "cifar10" / "Linf" / "Carmon2019Unlabeled.pt"
    with pytest.raises(ModelError, match=f"put RobustBench's checkpoint at {expected}.*never downloads"):
        load_model("robustbench:cifar10/Linf/Carmon2019Unlabeled")
    with pytest.raises(ModelError, match="no cifar10 Linf model 'Wong2020Fst'.*Did you mean Wong2020Fast"):
        load_model("robustbench:cifar10/Linf/Wong2020Fst")
    with pytest.raises(ModelError, match="unknown RobustBench threat model 'linf'; use one of Linf, L2"):
        load_model("robustbench:cifar10/linf/Wong2020Fast")
    with pytest.raises(ModelError, match="not 'imagenet'"):
        load_model("robustbench:imagenet/Linf/Standard_R50")
    with pytest.raises(ModelError, match="write robustbench:DATASET/THREAT/NAME"):
        load_model("robustbench:Wong2020Fast")
    with pytest.raises(ModelError, match="served by timm from the Hugging Face hub"):
        load_model("robustbench:cifar10/Linf/Debenedetti2022Light_XCiT-S12")
    wrong = folder / "cifar10" / "L2" / "Sehwag2021Proxy_R18.pt"
    wrong.parent.mkdir()
    wrong.write_bytes(path.read_bytes())  # another architecture's weights
    with pytest.raises(
        ModelError, match=f"robustbench could not load robustbench:cifar10/L2/Sehwag2021Proxy_R18 from {wrong}"
    ):
        load_model("robustbench:cifar10/L2/Sehwag2021Proxy_R18")


def test_robustbench_entry_evaluated_from_the_cli(tmp_path, monkeypatch, capsys, robustbench_dir, cifar10_folder):
    _, network, path = robustbench_dir
    monkeypatch.setenv("INVARBENCH_HOME", str(tmp_path / "home"))
    cifar10_folder(tmp_path / "home" / "cifar10" / "cifar-10-batches-py", train_per_batch=2, test=10)
    code, out, err = run_cli(
        capsys,
        "run",
        ZOO_ENTRY,
        "--n",
        10,
        "--attack",
        "pgd:steps=2",
        "--out",
        tmp_path,
        "--name",
        "zoo",
        "--no-progress",
    )
    assert code == 0, err
    assert "Wong2020Fast" in out and "linf 0.0313725" in out, "the default threat is CIFAR-10's headline l_inf 8/255"
    run = json.loads((tmp_path / "zoo" / "summary.json").read_text())["models"]["Wong2020Fast"]
    images, labels = load_dataset("cifar10").evaluation_subset(10)
    with torch.no_grad():
        assert run["clean_correct"] == int((network(images).argmax(1) == labels).sum())
    assert run["dataset"] == "cifar10" and run["checkpoint_sha256"] == sha256_file(path)
    assert run_cli(capsys, "leaderboard", "add", tmp_path / "zoo", "--entries", tmp_path / "entries")[0] == 0
    entry = json.loads((tmp_path / "entries" / "Wong2020Fast__cifar10__perturbation.json").read_text())
    assert entry["reference"] == ZOO_ENTRY and entry["model_card"]["architecture"] == "RobustBench zoo"
    code, out, err = run_cli(capsys, "check", "--entries", tmp_path / "entries", "--no-progress")
    assert code == 0 and "ok   Wong2020Fast__cifar10__perturbation" in out, out + err
    code, _, err = run_cli(capsys, "run", ZOO_ENTRY, "--dataset", "mnist", "--out", tmp_path, "--no-progress")
    assert code == 1 and "is a cifar10 model" in err


# ------------------------------------------------------------------------------------------ CIFAR-10


def test_cifar10_headline_threats_and_default():
    assert HEADLINE_THREATS["cifar10"] == ("linf:0.03137254901960784", "l2:0.5")
    (threat,) = default_threats((ModelSpec("model.onnx", "cifar10"),))
    assert threat.norm == "linf" and threat.epsilons == (CIFAR_LINF,)


def test_cifar10_end_to_end_run_entry_table_check(tmp_path, monkeypatch, capsys, cifar10_folder):
    """run -> leaderboard entry -> tables and plots -> `invarbench check`, on a CIFAR-format fixture
    in the cache folder and a small TorchScript CNN at both headline threats."""
    monkeypatch.setenv("INVARBENCH_HOME", str(tmp_path / "home"))
    cifar10_folder(tmp_path / "home" / "cifar10" / "cifar-10-batches-py", train_per_batch=2, test=20, seed=3)
    model_path = tmp_path / "cifar-cnn.pt"
    torch.jit.save(torch.jit.script(small_cnn(3, 32, seed=1)), str(model_path))
    entries, tables = tmp_path / "entries", tmp_path / "tables"
    threats = ["--threat", "linf:0.03137254901960784", "--threat", "l2:0.5"]
    code, out, err = run_cli(
        capsys,
        "run",
        model_path,
        "--dataset",
        "cifar10",
        *threats,
        "--attack",
        "fgsm",
        "--attack",
        "pgd:steps=3",
        "--n",
        20,
        "--shard-size",
        10,
        "--out",
        tmp_path,
        "--name",
        "cifar",
        "--no-progress",
    )
    assert code == 0, err
    assert "linf 0.0313725" in out and "l2 0.5" in out
    assert run_cli(capsys, "leaderboard", "add", tmp_path / "cifar", "--entries", entries)[0] == 0
    entry = json.loads((entries / "cifar-cnn__cifar10__perturbation.json").read_text())
    assert entry["dataset"] == "cifar10" and set(entry["results"]["threats"]) == {"linf", "l2"}
    assert math.isclose(float(next(iter(entry["results"]["threats"]["linf"]))), CIFAR_LINF, rel_tol=1e-5)
    code, _, err = run_cli(
        capsys, "leaderboard", "build", "--entries", entries, "--out", tables, "--site", tmp_path / "site"
    )
    assert code == 0, err
    table = (tables / "cifar10-perturbation-summary.md").read_text()
    assert "| linf 0.0313725 | l2 0.5 |" in table and "cifar-cnn" in table
    assert (tables / "cifar10-robustness-linf.svg").exists() and (tables / "cifar10-robustness-l2.svg").exists()
    assert not list(tables.glob("mnist-*")), "tables are per data set"
    code, out, err = run_cli(capsys, "check", "--entries", entries, "--no-progress")
    assert code == 0, out + err
    assert "ok   cifar-cnn__cifar10__perturbation" in out


def test_model_and_data_set_must_agree(tmp_path, monkeypatch, capsys, cifar10_folder):
    monkeypatch.setenv("INVARBENCH_HOME", str(tmp_path / "home"))
    cifar10_folder(tmp_path / "home" / "cifar10" / "cifar-10-batches-py", train_per_batch=2, test=10)
    cifar = load_dataset("cifar10")
    export_onnx(small_cnn(1, 28), tmp_path / "mnist-shaped.onnx", (1, 28, 28))
    code, _, err = run_cli(
        capsys,
        "run",
        tmp_path / "mnist-shaped.onnx",
        "--dataset",
        "cifar10",
        "--n",
        10,
        "--out",
        tmp_path / "runs",
        "--no-progress",
    )
    assert code == 1 and "takes inputs of shape [1, 28, 28] but cifar10 images have shape [3, 32, 32]" in err
    # A TorchScript file declares no shape: the failing forward pass is reported instead of a traceback.
    torch.jit.save(torch.jit.script(small_cnn(1, 28)), str(tmp_path / "mnist-shaped.pt"))
    code, _, err = run_cli(
        capsys,
        "run",
        tmp_path / "mnist-shaped.pt",
        "--dataset",
        "cifar10",
        "--n",
        10,
        "--out",
        tmp_path / "runs",
        "--no-progress",
    )
    assert code == 1 and "fails on 10 inputs of shape [3, 32, 32]" in err and "check --dataset" in err
    with pytest.raises(ModelError, match=r"takes inputs in \[0.0, 255.0\] but cifar10 images lie in \[0.0, 1.0\]"):
        check_compatible(BenchmarkModel(small_cnn(3, 32), bounds=(0, 255), num_classes=10), cifar, source="bytes-model")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ---------------------------------------------------------------------------------------------- CUDA


def test_cuda_refused_with_a_clear_error_without_a_gpu(tmp_path, monkeypatch, capsys, isolated_registry):
    from invarbench.models import get_card
    from invarbench.training import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(
        capsys, "run", "mnist-cnn-standard", "--device", "cuda", "--n", 5, "--out", tmp_path / "runs", "--no-progress"
    )
    assert code == 1 and "--device cuda was asked for but torch sees no CUDA device" in err
    assert not (tmp_path / "runs").exists()
    isolated_registry("spheres-mlp-standard")
    with pytest.raises(ConfigError, match="no CUDA device"):
        train(get_card("spheres-mlp-standard"), device="cuda", progress=False)
