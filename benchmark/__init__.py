"""invarbench: adversarial robustness measured from both sides, sensitivity and invariance."""

__version__ = "0.1.0"

__all__ = ["Results", "__version__", "evaluate"]


def __getattr__(name: str):
    # The Python API is imported on first use, so that `import invarbench` (and `invarbench --help`) stays light.
    if name in ("evaluate", "Results"):
        from invarbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'invarbench' has no attribute {name!r}")
