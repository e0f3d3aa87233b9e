"""What `make device-check` carries to a lent GPU machine, which reaches no package registry: the wheels
of the packages its image lacks, and MNIST packed small (``make device-wheels``).

The machine's image has Python 3.12 with torch, numpy, pandas, pyarrow, scipy, scikit-learn, matplotlib,
jinja2, tqdm and pytest (the device tool's KINDS.md lists its packages). It lacks foolbox (and its
GitPython, gitdb, smmap and eagerpy), pyautoattack, FrEIA and tomli-w; setuptools travels too, so that
the project installs there in editable mode with the setuptools it is built with here. Each is taken
at the version this environment runs (pure-Python wheels: one file serves Python 3.12). pyautoattack's
wheel holds 45 MB of example checkpoints that no code imports: they are dropped from the copy carried.
Writes ``.device/wheels/*.whl`` and ``.device/mnist-packed.npz`` (``.device`` is ignored by git and named
in the device tool's ``carry``).

    python benchmarks/device_wheels.py [--out .device]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("foolbox", "eagerpy", "GitPython", "gitdb", "smmap", "pyautoattack", "FrEIA", "tomli-w", "setuptools")
#: Members of a wheel that are left out of the carried copy (file-name prefixes inside the wheel).
DROPPED = {"pyautoattack": ("pyautoattack/examples/",)}


def requirement(package: str) -> str:
    return f"{package}=={metadata.version(package)}"


def strip_wheel(wheel: Path, prefixes: tuple[str, ...]) -> None:
    """Rewrite ``wheel`` without the members under ``prefixes``, its RECORD listing only what is left."""
    with zipfile.ZipFile(wheel) as source:
        kept = [info for info in source.infolist() if not info.filename.startswith(prefixes)]
        contents = {info.filename: source.read(info) for info in kept}
    record_name = next(name for name in contents if name.endswith(".dist-info/RECORD"))
    lines = []
    for name, data in contents.items():
        if name == record_name:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    contents[record_name] = ("\n".join([*lines, f"{record_name},,"]) + "\n").encode()
    temporary = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for info in kept:
            target.writestr(info, contents[info.filename], compress_type=zipfile.ZIP_DEFLATED)
    temporary.replace(wheel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".device")
    args = parser.parse_args()
    wheels = args.out / "wheels"
    with tempfile.TemporaryDirectory() as scratch:
        requirements = [requirement(package) for package in PACKAGES]
        # `pip wheel` takes a published wheel where there is one and builds one from the sdist where there is not
        # (FrEIA).
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", scratch, *requirements],
            check=True,
        )
        built = sorted(Path(scratch).glob("*.whl"))
        for wheel in built:
            for package, prefixes in DROPPED.items():
                if wheel.name.lower().startswith(package.lower() + "-"):
                    strip_wheel(wheel, prefixes)
        if wheels.exists():
            shutil.rmtree(wheels)
        wheels.mkdir(parents=True)
        for wheel in built:
            shutil.move(str(wheel), wheels / wheel.name)
    packed = args.out / "mnist-packed.npz"
    subprocess.run([sys.executable, "-m", "invarbench.cli", "data", "pack", "mnist", str(packed)], check=True)
    total = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    for path in sorted(args.out.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size / 1e6:7.2f} MB  {path.relative_to(args.out)}")
    print(f"{total / 1e6:7.2f} MB  in {args.out} (carry it: the device tool's carry ['.device'])")


if __name__ == "__main__":
    main()
