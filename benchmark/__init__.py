"""invarbench: adversarial robustness measured from both sides, sensitivity and invariance."""

__version__ = "0.1.0"
