"""The repository stays small enough to travel: a GPU machine lent through the device tool receives the
working tree and carried files, at most 64 MiB in all, and the wheels and compact MNIST that
`make device-check` carries need about 12 MB of that."""

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from invarbench.io import compact_png

ROOT = Path(__file__).resolve().parents[1]
#: Tracked files at most 50 MB (issue 25): the zoo's float32 checkpoints are 46 MB of it.
TRACKED_LIMIT_BYTES = 50_000_000


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    )
    return [ROOT / name for name in listed if name and (ROOT / name).is_file()]


def test_tracked_files_stay_under_the_limit():
    sizes = sorted(((path.stat().st_size, path.relative_to(ROOT)) for path in tracked_files()), reverse=True)
    total = sum(size for size, _ in sizes)
    largest = ", ".join(f"{name} {size / 1e6:.2f} MB" for size, name in sizes[:5])
    assert total <= TRACKED_LIMIT_BYTES, (
        f"tracked files weigh {total / 1e6:.2f} MB, over {TRACKED_LIMIT_BYTES / 1e6:.0f} MB (largest: {largest}); keep"
        " weights and data out of git"
    )


def test_compact_png_keeps_every_pixel_and_leaves_what_it_cannot_keep():
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = np.repeat(rng.integers(0, 256, (64, 64, 1), dtype=np.uint8), 3, axis=2)
    buffer = io.BytesIO()
    Image.fromarray(grey).convert("RGBA").save(buffer, format="PNG")
    compact = compact_png(buffer.getvalue())
    assert len(compact) < len(buffer.getvalue())
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(compact)).convert("RGB")), grey)
    # More than 256 colours: a palette would lose some, so the PNG is returned unchanged.
    colourful = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(colourful).save(buffer, format="PNG")
    assert compact_png(buffer.getvalue()) == buffer.getvalue()
