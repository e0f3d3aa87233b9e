"""Models from other ecosystems: ONNX files (converted to PyTorch by onnx2torch, so gradients flow) and
entries of RobustBench's model zoo (loaded by the ``robustbench`` package from a local model folder).

Nothing here downloads: a zoo entry whose weights are not in the model folder is refused with the exact
path RobustBench expects, before RobustBench (which would fetch it from Google Drive) is called.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from invarbench.errors import ModelError, did_you_mean
from invarbench.io import invarbench_home, sha256_file

ROBUSTBENCH_PREFIX = "robustbench:"
#: Environment variable naming the RobustBench model folder (default ``$INVARBENCH_HOME/robustbench``).
ROBUSTBENCH_DIR_ENV = "INVARBENCH_ROBUSTBENCH_DIR"
#: RobustBench data sets that are invarbench data sets too.
ROBUSTBENCH_DATASETS = ("cifar10",)
ROBUSTBENCH_INPUT_SHAPES = {"cifar10": (3, 32, 32)}
ROBUSTBENCH_CLASSES = {"cifar10": 10}
#: The newest ONNX opset whose every operator onnx2torch converts; newer models are lowered to it first.
ONNX2TORCH_OPSET = 17

# Kept for the life of the process: the operator schemas declared by _import_torchvision.
_torchvision_schemas: torch.library.Library | None = None


def _import_torchvision() -> None:
    """Import torchvision, which onnx2torch and robustbench import.

    PyPI's torchvision wheel for Linux is built against the CUDA build of torch; beside the CPU build
    that ``make install`` installs, its C++ operators cannot load, and ``import torchvision`` then fails
    where it registers shape functions for two of them (nms, qnms). Declaring those two schemas (with no
    kernels, so calling them still fails) lets the pure-Python parts import: the layers RobustBench's
    CIFAR-10 architectures and onnx2torch's converters use. A working torchvision is imported as it is.
    """
    global _torchvision_schemas
    try:
        import torchvision  # noqa: F401

        return
    except ImportError as error:
        raise ModelError(
            f"torchvision is not installed ({error}); install invarbench's dependencies with `make install`"
        ) from error
    except RuntimeError as error:
        if "torchvision::nms" not in str(error) or _torchvision_schemas is not None:
            raise ModelError(f"torchvision cannot be imported ({error}); reinstall it with `make install`") from error
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]
    _torchvision_schemas = torch.library.Library("torchvision", "DEF")
    for operator in ("nms", "qnms"):
        _torchvision_schemas.define(f"{operator}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401


# ---------------------------------------------------------------------------------------------- ONNX


@dataclass(frozen=True)
class OnnxModel:
    network: nn.Module
    #: The input shape the graph declares without the batch axis, or None where it is not fixed.
    input_shape: tuple[int, ...] | None


def load_onnx(path: Path) -> OnnxModel:
    """Convert the ONNX model at ``path`` to a PyTorch module (eval mode, differentiable)."""
    _import_torchvision()
    try:
        import onnx
        import onnx2torch  # noqa: F401
    except ImportError as error:
        raise ModelError(
            f"{path} needs the onnx and onnx2torch packages ({error}); install invarbench's dependencies with `make"
            " install`"
        ) from error

    fix = (
        "export it with torch.onnx.export(model, example, path, dynamo=False) (Keras: tf2onnx), or save a TorchScript"
        " file instead"
    )
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as error:  # protobuf's DecodeError, onnx's ValidationError, OSError, ...
        raise ModelError(
            f"{path} is not a valid ONNX model ({type(error).__name__}:"
            f" {(str(error).strip().splitlines() or [''])[0][:200]}); {fix}"
        ) from error
    if not proto.graph.node:
        raise ModelError(f"{path} is not an ONNX model (its graph has no operators); {fix}")
    try:
        network = _convert(proto)
    except NotImplementedError as error:
        # onnx2torch names the operator: "Converter is not implemented (OperationDescription(domain='',
        # operation_type='Unique', version=11))".
        raise ModelError(
            f"{path} uses an operator that onnx2torch cannot convert to PyTorch ({error}); re-export the model without"
            " it (another layer, or another opset_version) or as a TorchScript file"
        ) from error
    except Exception as error:
        raise ModelError(
            f"onnx2torch cannot convert {path} ({type(error).__name__}: {str(error)[:200]}); re-export it (another"
            " opset_version) or save a TorchScript file instead"
        ) from error
    initializers = {initializer.name for initializer in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    shape = None
    if len(inputs) == 1:
        dims = [
            dim.dim_value if dim.HasField("dim_value") else None for dim in inputs[0].type.tensor_type.shape.dim[1:]
        ]
        shape = tuple(dims) if dims and all(dims) else None
    return OnnxModel(network.eval(), shape)


def _convert(proto):
    """onnx2torch's conversion; a model of a newer opset than onnx2torch knows every operator in is
    first lowered with ONNX's own version converter (exporters write the newest opset by default)."""
    import onnx.version_converter
    from onnx2torch import convert

    try:
        return convert(proto)
    except NotImplementedError:
        opset = max((item.version for item in proto.opset_import if item.domain in ("", "ai.onnx")), default=0)
        if opset <= ONNX2TORCH_OPSET:
            raise
        try:
            lowered = onnx.version_converter.convert_version(proto, ONNX2TORCH_OPSET)
        except Exception:
            raise NotImplementedError(
                f"opset {opset} is newer than {ONNX2TORCH_OPSET}, the newest onnx2torch converts, and ONNX's version"
                " converter cannot lower it"
            ) from None
        return convert(lowered)


# ---------------------------------------------------------------------------------------- RobustBench


def is_robustbench(reference: str | os.PathLike) -> bool:
    return str(reference).startswith(ROBUSTBENCH_PREFIX)


def robustbench_dir() -> Path:
    """Where zoo weights are read from: ``$INVARBENCH_ROBUSTBENCH_DIR``, else ``$INVARBENCH_HOME/robustbench``."""
    return Path(os.environ.get(ROBUSTBENCH_DIR_ENV) or invarbench_home() / "robustbench")


@dataclass(frozen=True)
class ZooEntry:
    """``robustbench:DATASET/THREAT/NAME``, e.g. ``robustbench:cifar10/Linf/Carmon2019Unlabeled``."""

    dataset: str
    threat_model: str
    name: str

    @classmethod
    def parse(cls, reference: str) -> ZooEntry:
        parts = str(reference)[len(ROBUSTBENCH_PREFIX) :].split("/")
        if not str(reference).startswith(ROBUSTBENCH_PREFIX) or len(parts) != 3 or not all(parts):
            raise ModelError(
                f"{reference!r} is not a RobustBench name; write robustbench:DATASET/THREAT/NAME, e.g."
                " robustbench:cifar10/Linf/Carmon2019Unlabeled"
            )
        dataset, threat_model, name = parts
        if dataset not in ROBUSTBENCH_DATASETS:
            raise ModelError(
                f"{reference}: invarbench evaluates RobustBench's {', '.join(ROBUSTBENCH_DATASETS)} entries, not"
                f" {dataset!r} (not an invarbench data set)"
            )
        return cls(dataset, threat_model, name)

    def __str__(self) -> str:
        return f"{ROBUSTBENCH_PREFIX}{self.dataset}/{self.threat_model}/{self.name}"

    def files(self, model_dir: Path | None = None) -> list[Path]:
        """The checkpoint file(s) RobustBench reads for this entry (one per member of an ensemble)."""
        zoo = _zoo()
        threat = self._threat(zoo)
        gdrive = zoo[self._dataset_key()][threat][self.name]["gdrive_id"]
        path = Path(model_dir or robustbench_dir()) / self.dataset / threat.value / f"{self.name}.pt"
        return [Path(f"{path}_m{index}.pt") for index in range(len(gdrive))] if isinstance(gdrive, list) else [path]

    def _dataset_key(self):
        from robustbench.model_zoo.enums import BenchmarkDataset

        return BenchmarkDataset(self.dataset)

    def _threat(self, zoo):
        from robustbench.model_zoo.enums import ThreatModel

        try:
            threat = ThreatModel(self.threat_model)
        except ValueError:
            raise ModelError(
                f"{self}: unknown RobustBench threat model {self.threat_model!r}; use one of"
                f" {', '.join(item.value for item in ThreatModel)}"
            ) from None
        models = zoo[self._dataset_key()].get(threat, {})
        if self.name not in models:
            raise ModelError(
                f"{self}: RobustBench's zoo has no {self.dataset} {threat.value} model"
                f" {self.name!r}.{did_you_mean(self.name, models)} Names are listed at robustbench's"
                f" model_zoo/{self.dataset}.py"
            )
        return threat


def _zoo():
    """RobustBench's model dictionaries (importing the package on first use)."""
    _import_torchvision()
    # robustbench imports AutoAttack as ``autoattack`` (its GitHub name); the PyPI release, which
    # invarbench uses for its own AutoAttack, is the same code under the name ``pyautoattack``.
    try:
        import autoattack.state  # noqa: F401
    except ImportError:
        import pyautoattack
        import pyautoattack.state

        sys.modules["autoattack"], sys.modules["autoattack.state"] = pyautoattack, pyautoattack.state
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from robustbench.model_zoo import model_dicts
    except ImportError as error:
        raise ModelError(
            f"the robustbench package cannot be imported ({error}); install invarbench's dependencies with `make"
            " install`"
        ) from error
    return model_dicts


@dataclass(frozen=True)
class ZooModel:
    network: nn.Module
    entry: ZooEntry
    num_classes: int
    input_shape: tuple[int, ...]


def check_robustbench(reference: str, *, model_dir: Path | None = None) -> ZooEntry:
    """Refuse a zoo name that is unknown, served only online, or whose weights are not in the model
    folder, without loading it (and so before RobustBench could try a download)."""
    entry = ZooEntry.parse(reference)
    model_dir = Path(model_dir or robustbench_dir())
    files = entry.files(model_dir)
    import timm

    hosted = f"{entry.name.lower().replace('-', '_')}_{entry.dataset}_{entry.threat_model.lower()}"
    if timm.is_model(hosted):
        raise ModelError(
            f"{entry} is served by timm from the Hugging Face hub, which invarbench does not download from; export it"
            " to ONNX or TorchScript where it can be downloaded and evaluate that file"
        )
    missing = [path for path in files if not path.is_file()]
    if missing:
        raise ModelError(
            f"the weights of {entry} are not in the RobustBench model folder: put RobustBench's checkpoint at"
            f" {', '.join(map(str, missing))} (the folder is ${ROBUSTBENCH_DIR_ENV}, default"
            " $INVARBENCH_HOME/robustbench; `invarbench run --robustbench-dir DIR` names another); invarbench never"
            " downloads it"
        )
    return entry


def load_robustbench(reference: str, *, model_dir: Path | None = None) -> ZooModel:
    """A zoo entry's network as RobustBench builds it: inputs in [0, 1], its own normalisation inside."""
    model_dir = Path(model_dir or robustbench_dir())
    entry = check_robustbench(reference, model_dir=model_dir)
    files = entry.files(model_dir)
    from robustbench.utils import load_model as robustbench_load

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            network = robustbench_load(
                entry.name, model_dir=str(model_dir), dataset=entry.dataset, threat_model=entry.threat_model
            )
    except Exception as error:  # torch.load and load_state_dict raise many types for a wrong file
        raise ModelError(
            f"robustbench could not load {entry} from {', '.join(map(str, files))} ({type(error).__name__}:"
            f" {str(error).strip()[:300]}); the file must be RobustBench's checkpoint of that entry (a state_dict of"
            " its architecture saved with torch.save)"
        ) from error
    return ZooModel(network.eval(), entry, ROBUSTBENCH_CLASSES[entry.dataset], ROBUSTBENCH_INPUT_SHAPES[entry.dataset])


def robustbench_sha256(reference: str) -> str:
    """The sha256 of a zoo entry's checkpoint (of the members' sha256s, in order, for an ensemble)."""
    files = ZooEntry.parse(reference).files()
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(sha256_file(path) for path in files).encode()).hexdigest()
