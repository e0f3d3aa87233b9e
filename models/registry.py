"""Model cards (TOML) and loading: registry names, state_dict checkpoints and TorchScript files."""

from __future__ import annotations

import hashlib
import io
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch
from torch import nn

from invarbench.errors import ModelError, did_you_mean
from invarbench.io import atomic_write_bytes, atomic_write_text, read_toml, sha256_file
from invarbench.models import external
from invarbench.models.architectures import build_architecture
from invarbench.models.wrapper import BenchmarkModel

CARDS_DIR = Path(__file__).parent / "cards"
CHECKPOINTS_DIR = Path(__file__).parent / "checkpoints"
#: A folder of zoo checkpoints looked in before the package's own: the wheel does not ship the zoo's
#: weights (46 MB), a clone or an editable install (``pip install -e .``) has them in ``CHECKPOINTS_DIR``.
CHECKPOINTS_ENV = "INVARBENCH_CHECKPOINTS"


def checkpoint_dirs() -> list[Path]:
    """The folders searched for a card's checkpoint, in order: ``$INVARBENCH_CHECKPOINTS``, then the package's."""
    extra = os.environ.get(CHECKPOINTS_ENV)
    return [*([Path(extra)] if extra else []), CHECKPOINTS_DIR]


REQUIRED_FIELDS = {
    "": ("name", "dataset", "num_classes", "invertible", "notes"),
    "architecture": ("name", "args"),
    "input": ("shape", "bounds", "mean", "std"),
    "training": ("recipe", "seed"),
    "threat_model": ("norm", "eps"),
    "checkpoint": ("file", "sha256"),
    "clean_accuracy": ("value", "n"),
}


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to rebuild, load and describe one model; parsed from ``cards/NAME.toml``."""

    name: str
    dataset: str
    num_classes: int
    invertible: bool
    notes: str
    architecture: str
    architecture_args: dict[str, Any]
    input_shape: tuple[int, ...]
    bounds: tuple[float, float]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    training: dict[str, Any]
    threat_model: dict[str, Any]
    checkpoint_file: str
    checkpoint_sha256: str
    clean_accuracy: float
    clean_accuracy_n: int
    dataset_options: dict[str, Any] = field(default_factory=dict)
    robust_accuracy: tuple[dict[str, Any], ...] = ()
    #: "benchmark" for leaderboard models; "oracle" for the proxy oracle's members, which are never ranked.
    role: str = "benchmark"
    #: Invertible models: error of a classifier trained after the fact on the nuisance z_n.
    nuisance_classifier: dict[str, Any] = field(default_factory=dict)
    #: Why the checkpoint is not kept in the repository (``[checkpoint] retired``); empty where it is.
    checkpoint_retired: str = ""
    path: Path | None = None

    @property
    def checkpoint_path(self) -> Path:
        """The first of :func:`checkpoint_dirs` that holds the file; the package's folder where none does
        (where training writes it)."""
        return next(
            (
                folder / self.checkpoint_file
                for folder in checkpoint_dirs()
                if (folder / self.checkpoint_file).is_file()
            ),
            CHECKPOINTS_DIR / self.checkpoint_file,
        )

    @classmethod
    def from_toml(cls, path: Path) -> ModelCard:
        data = read_toml(path, "model card", ModelError)
        for table, keys in REQUIRED_FIELDS.items():
            section = data.get(table, {}) if table else data
            if not isinstance(section, dict):
                raise ModelError(
                    f"model card {path}: [{table}] must be a table; see models/cards/mnist-cnn-standard.toml for the"
                    " layout"
                )
            missing = [key for key in keys if key not in section]
            if missing:
                where = f"[{table}]" if table else "the top level"
                raise ModelError(
                    f"model card {path} lacks {', '.join(missing)} in {where}; add them (see"
                    " models/cards/mnist-cnn-standard.toml)"
                )
        bounds = tuple(float(value) for value in data["input"]["bounds"])
        if len(bounds) != 2 or not bounds[0] < bounds[1]:
            raise ModelError(f"model card {path}: [input] bounds {bounds} must be two increasing numbers [low, high]")
        return cls(
            name=data["name"],
            dataset=data["dataset"],
            num_classes=int(data["num_classes"]),
            invertible=bool(data["invertible"]),
            notes=data["notes"],
            architecture=data["architecture"]["name"],
            architecture_args=dict(data["architecture"]["args"]),
            input_shape=tuple(int(size) for size in data["input"]["shape"]),
            bounds=bounds,
            mean=tuple(float(value) for value in data["input"]["mean"]),
            std=tuple(float(value) for value in data["input"]["std"]),
            training=dict(data["training"]),
            threat_model=dict(data["threat_model"]),
            checkpoint_file=data["checkpoint"]["file"],
            checkpoint_sha256=data["checkpoint"]["sha256"],
            clean_accuracy=float(data["clean_accuracy"]["value"]),
            clean_accuracy_n=int(data["clean_accuracy"]["n"]),
            dataset_options=dict(data.get("dataset_options", {})),
            robust_accuracy=tuple(data.get("robust_accuracy", ())),
            role=str(data.get("role", "benchmark")),
            nuisance_classifier=dict(data.get("nuisance_classifier", {})),
            checkpoint_retired=str(data["checkpoint"].get("retired", "")),
            path=path,
        )

    def to_toml(self) -> str:
        data: dict[str, Any] = {
            "name": self.name,
            "dataset": self.dataset,
            "num_classes": self.num_classes,
            "invertible": self.invertible,
            "notes": self.notes,
        }
        if self.role != "benchmark":
            data["role"] = self.role
        if self.dataset_options:
            data["dataset_options"] = self.dataset_options
        data["architecture"] = {"name": self.architecture, "args": self.architecture_args}
        data["input"] = {
            "shape": list(self.input_shape),
            "bounds": list(self.bounds),
            "mean": list(self.mean),
            "std": list(self.std),
        }
        data["training"] = self.training
        data["threat_model"] = self.threat_model
        data["checkpoint"] = {
            "file": self.checkpoint_file,
            "sha256": self.checkpoint_sha256,
            **({"retired": self.checkpoint_retired} if self.checkpoint_retired else {}),
        }
        data["clean_accuracy"] = {"value": self.clean_accuracy, "n": self.clean_accuracy_n}
        if self.robust_accuracy:
            data["robust_accuracy"] = list(self.robust_accuracy)
        if self.nuisance_classifier:
            data["nuisance_classifier"] = self.nuisance_classifier
        return tomli_w.dumps(data, multiline_strings=True)

    def save(self, path: Path | None = None) -> Path:
        target = path or self.path or CARDS_DIR / f"{self.name}.toml"
        return atomic_write_text(target, self.to_toml())


def list_models(role: str | None = "benchmark") -> list[str]:
    """Registered model names with the given card role ("benchmark", "oracle"), or all for None."""
    names = sorted(path.stem for path in CARDS_DIR.glob("*.toml"))
    if role is None:
        return names
    return [
        name
        for name in names
        if tomllib.loads((CARDS_DIR / f"{name}.toml").read_text(encoding="utf-8")).get("role", "benchmark") == role
    ]


def get_card(name: str) -> ModelCard:
    path = CARDS_DIR / f"{name}.toml"
    if not path.exists():
        raise ModelError(_unknown_model_message(name))
    card = ModelCard.from_toml(path)
    if card.name != name:
        raise ModelError(f"model card {path} declares name {card.name!r}; rename the file or the name so they agree")
    return card


def _unknown_model_message(name: str) -> str:
    return (
        f"unknown model {name!r}.{did_you_mean(name, list_models(role=None), cutoff=0.5)} `invarbench models list`"
        " shows the registry; a checkpoint path must point to an existing file"
    )


def build_network(card: ModelCard) -> nn.Module:
    return build_architecture(card.architecture, **card.architecture_args)


def wrap(network: nn.Module, card: ModelCard) -> BenchmarkModel:
    return BenchmarkModel(
        network,
        bounds=card.bounds,
        num_classes=card.num_classes,
        mean=card.mean,
        std=card.std,
        name=card.name,
        input_shape=card.input_shape,
    )


def load_model(
    name_or_path: str | os.PathLike,
    *,
    architecture: str | None = None,
    architecture_args: dict[str, Any] | None = None,
    num_classes: int | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    mean: tuple[float, ...] = (0.0,),
    std: tuple[float, ...] = (1.0,),
    device: str | torch.device = "cpu",
    verify_checksum: bool = True,
) -> BenchmarkModel:
    """Return an eval-mode model that takes inputs in its bounds and returns logits.

    ``name_or_path`` is a registry name (see ``invarbench models list``), a RobustBench zoo name
    (``robustbench:cifar10/Linf/Carmon2019Unlabeled``, weights read from the RobustBench model folder;
    inputs in [0, 1], the zoo model's own normalisation inside) or a checkpoint file: an ONNX file
    (``.onnx``), a TorchScript file, or a state_dict when ``architecture`` names a registered
    architecture (its constructor arguments in ``architecture_args``). For ONNX and other user
    checkpoints ``bounds``, ``mean`` and ``std`` describe the expected inputs and normalisation.
    """
    name = str(name_or_path)
    if (CARDS_DIR / f"{name}.toml").exists():
        model = _load_registered(get_card(name), verify_checksum=verify_checksum)
    elif external.is_robustbench(name):
        zoo = external.load_robustbench(name)
        model = BenchmarkModel(
            zoo.network,
            bounds=(0.0, 1.0),
            num_classes=zoo.num_classes,
            name=zoo.entry.name,
            input_shape=zoo.input_shape,
        )
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise ModelError(_unknown_model_message(name))
        if path.is_dir():
            raise ModelError(f"checkpoint {path} is a directory; pass the checkpoint file itself")
        input_shape = None
        if architecture is None and path.suffix.lower() == ".onnx":
            converted = external.load_onnx(path)
            network, input_shape = converted.network, converted.input_shape
        elif architecture is None:
            network = _load_torchscript(path)
        else:
            arguments = dict(architecture_args or {})
            if num_classes is not None:
                arguments.setdefault("num_classes", num_classes)
            network = build_architecture(architecture, **arguments)
            _load_state_dict(network, path, hint="check --architecture and its arguments")
        classes = num_classes if num_classes is not None else int((architecture_args or {}).get("num_classes", 10))
        model = BenchmarkModel(
            network, bounds=bounds, num_classes=classes, mean=mean, std=std, name=path.stem, input_shape=input_shape
        )
    return model.to(device).eval()


def checkpoint_sha256(reference: str | os.PathLike) -> str:
    """The sha256 of the weights ``reference`` (a registry name, RobustBench name or file) loads."""
    name = str(reference)
    if (CARDS_DIR / f"{name}.toml").exists():
        return get_card(name).checkpoint_sha256
    if external.is_robustbench(name):
        return external.robustbench_sha256(name)
    return sha256_file(reference)


def declared_dataset(reference: str | os.PathLike) -> str | None:
    """The data set a registered model's card or a RobustBench name declares; None for a file."""
    name = str(reference)
    if (CARDS_DIR / f"{name}.toml").exists():
        return get_card(name).dataset
    return external.ZooEntry.parse(name).dataset if external.is_robustbench(name) else None


def _load_registered(card: ModelCard, *, verify_checksum: bool) -> BenchmarkModel:
    path = card.checkpoint_path
    if not path.exists() and card.checkpoint_retired:
        raise ModelError(
            f"checkpoint {card.checkpoint_file} of model {card.name} is in none of"
            f" {', '.join(str(folder) for folder in checkpoint_dirs())}: {card.checkpoint_retired} (or set"
            f" {CHECKPOINTS_ENV} to a folder holding the original file)"
        )
    if not path.exists():
        raise ModelError(
            f"checkpoint {card.checkpoint_file} of model {card.name} is in none of"
            f" {', '.join(str(folder) for folder in checkpoint_dirs())}; the wheel does not ship the zoo's weights:"
            f" install from a clone (pip install -e .), set {CHECKPOINTS_ENV} to a folder holding them, restore the"
            f" file from git or run `invarbench models train {card.name}`"
        )
    if verify_checksum:
        digest = sha256_file(path)
        if digest != card.checkpoint_sha256:
            raise ModelError(
                f"checkpoint {path} has sha256 {digest} but card {card.path} records {card.checkpoint_sha256}; "
                f"the file is corrupt or was replaced: restore it from git or run `invarbench models train {card.name}`"
            )
    network = build_network(card)
    _load_state_dict(
        network,
        path,
        hint=f"the card {card.path} and the checkpoint disagree; run `invarbench models train {card.name}`",
    )
    return wrap(network, card)


def save_state_dict(network: nn.Module, path: Path) -> str:
    """Write ``network``'s state_dict atomically and return its sha256.

    Serialised in memory first: torch.save names the archive inside the file after the file name, so
    saving straight to a temporary file would make the bytes (and the sha256) depend on that name.
    """
    buffer = io.BytesIO()
    # On the CPU whatever device trained it: the file then loads anywhere, and its bytes (and sha256) do
    # not say where it was trained. The same mapping type and version metadata as state_dict() gives.
    state = network.state_dict()
    on_cpu = type(state)((key, value.cpu()) for key, value in state.items())
    if hasattr(state, "_metadata"):
        on_cpu._metadata = state._metadata
    torch.save(on_cpu, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as error:  # torch.load raises many types (UnpicklingError, KeyError, RuntimeError, ...) for non-checkpoints
        raise ModelError(
            f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {str(error)[:200]}); pass a file written by"
            " torch.save(model.state_dict(), ...) or torch.jit.save"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ModelError(
            f"{path} holds a {type(state).__name__}, not a state_dict of tensors; save it with"
            " torch.save(model.state_dict(), path)"
        )
    return state


def _load_state_dict(network: nn.Module, path: Path, *, hint: str) -> None:
    state = read_state_dict(path)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    # Buffers left out of the state_dict (fi-revnet's permutations) may still be in older files: the
    # network checks them when it loads them.
    unexpected = sorted(set(state) - set(expected) - set(dict(network.named_buffers())))
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            part
            for part in (
                f"missing keys {missing[:5]}" if missing else "",
                f"unexpected keys {unexpected[:5]}" if unexpected else "",
                f"shape mismatches (checkpoint vs architecture) {mismatched[:5]}" if mismatched else "",
            )
            if part
        )
        raise ModelError(f"state_dict in {path} does not fit the architecture: {details}; {hint}")
    network.load_state_dict(state)


def _load_torchscript(path: Path) -> nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as error:
        raise ModelError(
            f"{path} is not a TorchScript file ({str(error).splitlines()[0][:200]}); for a state_dict pass the"
            " architecture it belongs to (--architecture NAME, see `invarbench models list --architectures`)"
        ) from error
