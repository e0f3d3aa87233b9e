"""Atomic file writes and hashing (results and checkpoints are never left half-written), TOML files read
with errors that name them, and the cache directory."""

from __future__ import annotations

import hashlib
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
