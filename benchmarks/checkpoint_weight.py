"""What the zoo's checkpoints weigh, and what storing them smaller would cost in figures.

For every committed checkpoint (``models/checkpoints/*.pt``, the benchmark models and the oracles'
members) it measures: the file's bytes; the bytes after lossless compression (lzma, preset 6, of the
file as it is); the bytes of the same state_dict saved with its floating-point tensors in float16; and,
loading those float16 weights back into float32, how many of the model's predictions on the first N
test points of its data set change and the largest change of a logit. Writes the measurement as JSON
for the table in docs/models.md (``python benchmarks/report.py``).

    python benchmarks/checkpoint_weight.py [--n 10000] [--out benchmarks/results/checkpoint_weight.json]
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
from pathlib import Path

import torch

from invarbench.datasets import load_dataset
from invarbench.environment import measurement_header
from invarbench.models import get_card, list_models, load_model


def _half_bytes(path: Path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    buffer = io.BytesIO()
    torch.save({key: value.half() if value.is_floating_point() else value for key, value in state.items()}, buffer)
    return buffer.getbuffer().nbytes


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[start : start + 1000]) for start in range(0, len(images), 1000)])


def measure(name: str, n: int, subsets: dict) -> dict:
    card = get_card(name)
    path = card.checkpoint_path
    if card.dataset not in subsets:
        subsets[card.dataset] = load_dataset(card.dataset, **card.dataset_options).evaluation_subset(n)
    images, _ = subsets[card.dataset]
    model = load_model(name).eval()
    before = _logits(model, images)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    after = _logits(model, images)
    raw = path.read_bytes()
    return {
        "model": name,
        "role": card.role,
        "bytes": len(raw),
        "lzma_bytes": len(lzma.compress(raw, preset=6)),
        "float16_bytes": _half_bytes(path),
        "points": len(images),
        "float16_prediction_changes": int((before.argmax(1) != after.argmax(1)).sum()),
        "float16_max_logit_change": float((before - after).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n",
        type=int,
        default=10000,
        help="test points per data set (default 10000; fewer where the test set is smaller)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "checkpoint_weight.json")
    args = parser.parse_args()
    rows, subsets = [], {}
    for name in list_models(None):
        if get_card(name).checkpoint_retired and not get_card(name).checkpoint_path.exists():
            print(f"{name}: checkpoint retired from the repository, left out")
            continue
        rows.append(measure(name, args.n, subsets))
        row = rows[-1]
        print(
            f"{name}: {row['bytes'] / 1e6:.2f} MB, lzma {row['lzma_bytes'] / 1e6:.2f} MB, float16"
            f" {row['float16_bytes'] / 1e6:.2f} MB; float16 changes {row['float16_prediction_changes']} of"
            f" {row['points']} predictions, logits by at most {row['float16_max_logit_change']:.2g}",
            flush=True,
        )
    totals = {key: sum(row[key] for row in rows) for key in ("bytes", "lzma_bytes", "float16_bytes")}
    print(
        f"total: {totals['bytes'] / 1e6:.2f} MB, lzma {totals['lzma_bytes'] / 1e6:.2f} MB, float16"
        f" {totals['float16_bytes'] / 1e6:.2f} MB"
    )
    report = {**measurement_header("checkpoint_weight"), "n": args.n, "rows": rows, "totals": totals}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
