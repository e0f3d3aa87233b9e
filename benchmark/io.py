"""Atomic file writes and hashing (results and checkpoints are never left half-written), TOML files read
with errors that name them, and the cache directory."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path


def invarbench_home() -> Path:
    """The cache directory: ``$INVARBENCH_HOME``, default ``~/.cache/invarbench``."""
    return Path(os.environ.get("INVARBENCH_HOME") or Path.home() / ".cache" / "invarbench")


def read_toml(path: Path, what: str, error: type[Exception]) -> dict:
    """The TOML file ``path`` (a model card, an oracle definition: ``what``); ``error`` names the file
    and the fix where it cannot be read or parsed."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as problem:
        raise error(f"{what} {path} cannot be read ({problem}); fix its TOML syntax") from problem


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file lives in the destination folder so the rename is atomic on POSIX; a crash
    leaves either the old file or the new one, never a mixture.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp_path = Path(tmp_name)
    try:
        write(tmp_path)
        # mkstemp creates the file private (0600); results and checkpoints are meant to be shared.
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_figure(path: str | os.PathLike, figure, suffix: str = "png") -> Path:
    """Write a matplotlib figure atomically as PNG or SVG at 100 dpi, without the metadata that changes
    on every build (so the same figure always gives the same bytes). A PNG goes through
    :func:`compact_png`."""
    if suffix != "png":
        return atomic_write(
            path, lambda tmp: figure.savefig(tmp, format=suffix, dpi=100, metadata={"Creator": None, "Date": None})
        )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return atomic_write_bytes(path, compact_png(buffer.getvalue()))


def compact_png(data: bytes) -> bytes:
    """The same PNG as a palette image where that keeps every pixel: an opaque picture of at most 256
    colours (galleries of grey digits, most plots) takes 2-3x fewer bytes so, and the repository that
    travels to a GPU machine stays small. Anything else is returned as it is."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    pixels = np.asarray(image.convert("RGBA"))
    if pixels[..., 3].min() < 255:
        return data
    palette = image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    if not np.array_equal(np.asarray(palette.convert("RGBA")), pixels):
        return data
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue() if len(buffer.getvalue()) < len(data) else data
