"""invarbench.models: the model registry, model cards, architectures, training recipes and the zoo."""

from invarbench.models import invertible as _invertible  # noqa: F401  (registers fi-revnet)
from invarbench.models.architectures import ARCHITECTURES, build_architecture, register_architecture
from invarbench.models.registry import ModelCard, get_card, list_models, load_model
from invarbench.models.wrapper import BenchmarkModel

__all__ = [
    "ARCHITECTURES",
    "BenchmarkModel",
    "ModelCard",
    "build_architecture",
    "get_card",
    "list_models",
    "load_model",
    "register_architecture",
]
