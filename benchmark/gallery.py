"""Galleries of invariance candidates from a run directory: the test image, where the candidate's
content came from (for metamers the partner x_b) and the candidate, with the model's and the oracle's
labels under each."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from invarbench.config import entry_config
from invarbench.datasets import load_dataset
from invarbench.errors import ConfigError
from invarbench.evaluation import predict
from invarbench.io import write_figure
from invarbench.oracles import default_oracle
from invarbench.plan import plan
from invarbench.store import RunStore, read_json
from invarbench.tracks import PERTURBATION


def candidate_image(run_dir: Path, record: pd.Series, shard_size: int, _jobs: dict | None = None) -> np.ndarray:
    """The stored candidate image of one invariance record (``_jobs`` keeps each job's arrays read once)."""
    store = RunStore(run_dir)
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", record["model"])
    shard = int(record["index"]) // shard_size
    job_id = f"{model}__{record['norm']}__{int(record['attack_index']):02d}-{record['attack']}__shard{shard:05d}"
    jobs = {} if _jobs is None else _jobs
    if job_id not in jobs:
        path = store.candidates_dir / f"{job_id}.npz"
        if not path.exists():
            raise ConfigError(
                f"{path} is missing; the run in {run_dir} is incomplete or was not written by this version of"
                " invarbench"
            )
        jobs[job_id] = (np.load(path)["candidates"], sorted(store.read_job(job_id)[0]["eps"].unique()))
    candidates, epsilons = jobs[job_id]
    return candidates[epsilons.index(record["eps"]), int(record["index"]) - shard * shard_size]


def invariance_gallery(
    run_dir: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    attack: str | None = None,
    count: int = 8,
    title: str | None = None,
) -> Path:
    """Draw up to ``count`` candidates whose label the oracle says changed (all candidates if none did)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    store = RunStore(run_dir)
    if not store.invariance_path.exists():
        raise ConfigError(
            f"{run_dir} has no invariance.parquet; run invariance attacks first (e.g. --attack invariance-linf) and let"
            " the run finish"
        )
    manifest = read_json(store.manifest_path)
    records = pd.read_parquet(store.invariance_path)
    records = records[records["ran"]]
    if model:
        records = records[records["model"] == model]
    if attack:
        records = records[records["attack"] == attack]
    if records.empty:
        raise ConfigError(
            f"no invariance records in {run_dir} for model={model!r} attack={attack!r}; check the names in its"
            " summary.json"
        )
    changed = records[records["oracle_label"].notna() & (records["oracle_label"] != records["label"])]
    chosen = (changed if len(changed) else records).head(count)
    dataset_name = next(
        entry["dataset"] for entry in manifest["config"]["models"] if entry["key"] == chosen.iloc[0]["model"]
    )
    dataset = load_dataset(dataset_name)
    shard_size = manifest["config"]["shard_size"]
    columns = 3
    figure, axes = plt.subplots(len(chosen), columns, figsize=(columns * 1.9, len(chosen) * 2.0), squeeze=False)
    jobs: dict = {}
    for row, (_, record) in enumerate(chosen.iterrows()):
        original = dataset.test_images[int(record["index"])].numpy()
        source_index = record["source_index"]
        if pd.isna(source_index):
            source, source_title = None, "no source"
        elif record["attack"] == "metameric":
            source, source_title = (
                dataset.test_images[int(source_index)].numpy(),
                f"x_b: test {int(source_index)}\nlabel {int(record['target_class'])}",
            )
        elif record["attack"] == "invariance-set":
            source, source_title = None, "fixed set"
        else:
            source, source_title = (
                dataset.train_images[int(source_index)].numpy(),
                f"train {int(source_index)}\nclass {int(record['target_class'])}",
            )
        candidate = candidate_image(run_dir, record, shard_size, jobs)
        oracle = "abstains" if pd.isna(record["oracle_label"]) else str(int(record["oracle_label"]))
        panels = [
            (
                original,
                f"test {int(record['index'])}\nlabel {int(record['label'])}, model {int(record['clean_prediction'])}",
            ),
            (source, source_title),
            (
                candidate,
                (
                    f"{record['attack']} {record['norm']} {record['eps']:g}\nmodel {int(record['model_prediction'])},"
                    f" oracle {oracle}"
                ),
            ),
        ]
        for column, (image, caption) in enumerate(panels):
            axis = axes[row, column]
            axis.set_xticks([])
            axis.set_yticks([])
            if image is not None:
                axis.imshow(
                    (
                        np.asarray(image).reshape(28, 28)
                        if np.asarray(image).size == 784
                        else np.asarray(image).reshape(1, -1)
                    ),
                    cmap="gray",
                    vmin=0,
                    vmax=1,
                )
            axis.set_title(caption, fontsize=7)
    figure.suptitle(title or f"{chosen.iloc[0]['model']}: oracle {chosen.iloc[0]['oracle']}", fontsize=8)
    figure.tight_layout()
    out = Path(out)
    suffix = out.suffix.lstrip(".") or "png"
    write_figure(out, figure, suffix)
    plt.close(figure)
    return out


def perturbation_gallery(entry: dict, entries_dir: str | Path, out: str | Path, *, count: int = 6) -> Path:
    """Clean and adversarial images of a perturbation entry, with the model's and the oracle's labels.

    The adversarial examples are recomputed, not stored: the entry's first attack (FGSM or PGD) is
    re-run on its first shard with that job's seed and batch, exactly as in the run (as ``invarbench
    check`` does), and only points whose outcome matches the entry's stored records are drawn. Each
    point is shown at the smallest evaluated eps of the entry's first norm at which the attack broke it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if entry["track"] != PERTURBATION.name:
        raise ConfigError(f"entry {entry['model']} ({entry['track']}) is not a perturbation entry")
    shard_size = entry["settings"]["shard_size"]
    config = entry_config(entry, min(shard_size, entry["settings"]["n"]))
    first_norm = config.threats[0].norm
    jobs = [job for job in plan(config) if job.attack_index == 0 and job.shard == 0 and job.threat.norm == first_norm]
    if not jobs or jobs[0].attack.name not in ("fgsm", "pgd", "foolbox-pgd"):
        raise ConfigError(
            f"entry {entry['model']}: its first attack is not FGSM or PGD, which keep their examples; no adversarial"
            " gallery"
        )
    job = jobs[0]
    dataset = load_dataset(entry["dataset"])
    if dataset.test_images.dim() != 4:
        raise ConfigError(f"data set {entry['dataset']!r} has no images to draw")
    images, labels = dataset.evaluation_subset(job.stop)
    model = config.models[0].load(dataset.num_classes, dataset.bounds).eval()
    clean = predict(model, images)
    correct = clean == labels
    points = correct.nonzero().flatten()
    if not len(points):
        raise ConfigError(
            f"entry {entry['model']}: the model classifies no point of the first shard correctly; no adversarial"
            " gallery"
        )
    epsilons = job.threat.epsilons
    result = job.attack.create()(
        model,
        images[points],
        labels[points],
        norm=job.threat.norm,
        epsilons=epsilons,
        seed=job.seed,
        active=correct[points].unsqueeze(0).repeat(len(epsilons), 1),
    )
    stored = pd.read_parquet(Path(entries_dir) / entry["regression"]["file"])
    stored = stored[(stored["attack_index"] == 0) & (stored["norm"] == job.threat.norm) & (stored["index"] < job.stop)]
    chosen = []
    for position, point in enumerate(points.tolist()):
        for eps_index, eps in enumerate(epsilons):
            record = stored[(stored["index"] == point) & (stored["eps"] == eps)]
            if not bool(result.success[eps_index, position]):
                continue
            # Drawn only where the re-run reproduces the stored outcome and prediction.
            if (
                len(record) == 1
                and bool(record["success"].iloc[0])
                and int(record["adversarial_prediction"].iloc[0])
                == int(result.adversarial_predictions[eps_index, position])
            ):
                chosen.append((point, eps_index, position))
            break
        if len(chosen) == count:
            break
    if not chosen:
        raise ConfigError(
            f"entry {entry['model']}: {job.attack.name} broke no point of the first shard reproducibly; no adversarial"
            " gallery"
        )
    oracle = default_oracle(dataset)
    originals = images[[point for point, _, _ in chosen]]
    adversarial = torch.stack([result.adversarials[eps_index, position] for _, eps_index, position in chosen])
    oracle_clean, oracle_adversarial = oracle.label(originals).tolist(), oracle.label(adversarial).tolist()

    def said(label: int) -> str:
        return "abstains" if label < 0 else str(label)

    figure, axes = plt.subplots(len(chosen), 2, figsize=(2 * 1.9, len(chosen) * 2.0), squeeze=False)
    for row, (point, eps_index, position) in enumerate(chosen):
        panels = [
            (
                originals[row],
                (
                    f"test {point}: label {int(labels[point])}\nmodel {int(clean[point])}, oracle"
                    f" {said(oracle_clean[row])}"
                ),
            ),
            (
                adversarial[row],
                (
                    f"{job.attack.name} {job.threat.norm} {epsilons[eps_index]:g} (norm"
                    f" {float(result.norms[eps_index, position]):.3g})\nmodel"
                    f" {int(result.adversarial_predictions[eps_index, position])}, oracle"
                    f" {said(oracle_adversarial[row])}"
                ),
            ),
        ]
        for column, (image, caption) in enumerate(panels):
            axis = axes[row, column]
            axis.set_xticks([])
            axis.set_yticks([])
            picture = image.detach().cpu().numpy()
            axis.imshow(
                picture[0] if picture.shape[0] == 1 else picture.transpose(1, 2, 0),
                cmap="gray",
                vmin=dataset.bounds[0],
                vmax=dataset.bounds[1],
            )
            axis.set_title(caption, fontsize=7)
    figure.suptitle(f"{entry['model']}\n{job.attack.name} examples, oracle {oracle.name}", fontsize=8)
    figure.tight_layout()
    out = Path(out)
    write_figure(out, figure)
    plt.close(figure)
    return out
