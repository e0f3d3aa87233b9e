"""Where a run happens: the device to run on, and the CPU and package versions recorded with every
result (float rounding depends on them)."""

from __future__ import annotations

import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch

from invarbench import __version__
from invarbench.errors import ConfigError

PACKAGES = ("torch", "numpy", "foolbox", "pyautoattack", "pandas", "pyarrow")


def cpu_description() -> str:
    """The CPU's model name and the vector kernels torch uses on it: what float rounding depends on."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def gpu_description(device: torch.device) -> str:
    """The GPU a CUDA device is, with the CUDA and driver-facing versions torch was built for."""
    properties = torch.cuda.get_device_properties(device)
    return f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"


def measurement_header(
    benchmark: str, threads: int | None = None, device: str | torch.device = "cpu"
) -> dict[str, object]:
    """What every file in benchmarks/results/ opens with: the benchmark, the command that measured it,
    when, with how many torch threads (default: this process's), on which CPU and, for a measurement
    on CUDA, which GPU."""
    device = torch.device(device)
    return {
        "benchmark": benchmark,
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads() if threads is None else threads,
        "cpu": cpu_description(),
        **(
            {"device": "cuda", "gpu": gpu_description(device), "torch": torch.__version__}
            if device.type == "cuda"
            else {}
        ),
    }


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "invarbench": __version__}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def full_float32_on_cuda() -> None:
    """Compute in full float32 on CUDA: torch lets cuDNN's convolutions use TF32 on Ampere and later GPUs
    by default, which rounds their inputs to a 10-bit mantissa (about 1e-3 relative, against float32's
    1e-7), so a run on a GPU would not give the CPU's figures within float32 rounding. Robust accuracy decided
    at that scale is what a benchmark must not leave to the hardware."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def resolve_device(device: str) -> torch.device:
    """The torch device for ``auto``, ``cpu`` or ``cuda``; on CUDA in full float32 (see
    :func:`full_float32_on_cuda`)."""
    chosen = _resolve_device(device)
    if chosen.type == "cuda":
        full_float32_on_cuda()
    return chosen


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)
