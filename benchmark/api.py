"""The Python API: ``invarbench.evaluate`` and the ``Results`` it returns.

::

    import invarbench
    results = invarbench.evaluate("mnist-cnn-standard", threats="linf:0.1,0.3", attacks=["fgsm", "pgd:steps=40"], n=500)
    print(results.summary())        # the table `invarbench run` prints
    frame = results.to_pandas()     # one row per model, norm, eps and attack (cumulative robust accuracy)

``evaluate`` runs through the same resumable runner as ``invarbench run`` (which calls ``run_config``
here too), so calling it again with the same arguments resumes from the run directory.

Only the standard library is imported at module level: the CLI imports ``format_table`` from here,
and ``invarbench --help`` must stay fast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invarbench.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

    from invarbench.config import ModelSpec, RunConfig
    from invarbench.executors import ExecutorSettings

#: The parent folder of run directories when none is given (`invarbench run --out`), relative to the working directory.
DEFAULT_RUNS_DIR = Path("runs")


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(value) for value in header]] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    """The text `invarbench run` prints after a run: robust accuracy per model, threat and eps after each
    perturbation attack in cascade order; invariance metrics per invariance attack and setting; the
    oracles' calibration. Empty when the run has neither."""
    import pandas as pd

    from invarbench.results import WORST_CASE, invariance_frame, robustness_frame

    parts = []
    rows = []
    order = summary["attack_order"]
    robustness = robustness_frame(summary["models"].items())
    for (model, norm, eps), result in robustness.groupby(["model", "norm", "setting"], sort=False):
        entry = summary["models"][model]
        robust = dict(zip(result["attack"], result["robust_accuracy"]))
        # In cascade order, "-" where an attack did not run at this eps (e.g. autoattack:eps=0.3).
        cells = [f"{100 * robust[label]:.1f}%" if label in robust else "-" for label in order]
        rows.append(
            [
                model,
                f"{100 * entry['clean_accuracy']:.1f}%",
                f"{norm} {eps}",
                *cells,
                f"{100 * robust[WORST_CASE]:.1f}%",
                "yes" if entry["warnings"] else "no",
            ]
        )
    if rows:
        parts.append(
            format_table(
                ["model", "clean", "threat", *[f"after {label}" for label in order], "worst case", "check warnings"],
                rows,
            )
        )
    invariance_rows = []
    for metrics in invariance_frame(summary["models"].items()).to_dict("records"):
        accuracy, low_high = metrics["invariance_accuracy"], metrics["invariance_accuracy_ci95"]
        excessive, excessive_interval = metrics["excessive_invariance_rate"], metrics["excessive_invariance_rate_ci95"]
        invariance_rows.append(
            [
                metrics["model"],
                metrics["attack"],
                metrics["setting"],
                ",".join(metrics["oracle"]),
                f"{metrics['label_changed']}/{metrics['candidates']} ({metrics['abstained']} abstained)",
                (
                    "-"
                    if pd.isna(accuracy)
                    else f"{100 * accuracy:.1f}% [{100 * low_high[0]:.1f}, {100 * low_high[1]:.1f}]"
                ),
                (
                    "-"
                    if pd.isna(excessive)
                    else (
                        f"{100 * excessive:.1f}% [{100 * excessive_interval[0]:.1f}, {100 * excessive_interval[1]:.1f}]"
                    )
                ),
            ]
        )
    if invariance_rows:
        from invarbench.oracles.calibration import calibration_summary

        parts.append("")
        parts.append(
            format_table(
                [
                    "model",
                    "invariance attack",
                    "setting",
                    "oracle",
                    "label changed",
                    "invariance accuracy [95% CI]",
                    "excessive invariance [95% CI]",
                ],
                invariance_rows,
            )
        )
        parts.extend(
            f"oracle {name}: {calibration_summary(report)}" for name, report in summary.get("oracles", {}).items()
        )
    return "\n".join(parts)


@dataclass
class Results:
    """A finished run: its directory, summary and per-sample records.

    ``summary()`` is the text table `invarbench run` prints; ``to_pandas()`` the perturbation results
    as a long table; ``invariance_pandas()`` the invariance metrics; ``records`` and
    ``invariance_records`` the per-sample records (results.parquet, invariance.parquet).
    """

    run_dir: Path
    #: summary.json: clean accuracy, robust accuracy per attack and eps, invariance metrics, checks.
    summary_dict: dict[str, Any]
    #: The run's configuration as its manifest records it (RunConfig.to_dict()).
    config: dict[str, Any]
    records: pd.DataFrame
    invariance_records: pd.DataFrame | None = None
    jobs_run: int = 0
    jobs_resumed: int = 0

    @classmethod
    def load(
        cls,
        run_dir: str | os.PathLike,
        *,
        summary: dict[str, Any] | None = None,
        jobs_run: int = 0,
        jobs_resumed: int = 0,
    ) -> Results:
        """The results of a finished run directory (of `invarbench run` or ``evaluate``)."""
        from invarbench.store import RunStore, read_json, read_records

        store = RunStore(Path(run_dir))
        if not store.summary_path.exists():
            raise ConfigError(f"{store.run_dir} holds no finished run (no summary.json); run or resume it first")
        fix = f"re-run the same evaluation to rewrite {store.run_dir}"
        invariance = read_records(store.invariance_path, fix=fix) if store.invariance_path.exists() else None
        return cls(
            run_dir=store.run_dir,
            summary_dict=summary if summary is not None else read_json(store.summary_path),
            config=read_json(store.manifest_path)["config"],
            records=read_records(store.results_path, fix=fix),
            invariance_records=invariance,
            jobs_run=jobs_run,
            jobs_resumed=jobs_resumed,
        )

    def summary(self) -> str:
        """The text table `invarbench run` prints after a run."""
        return format_summary(self.summary_dict)

    def _epsilons(self) -> dict[tuple[str, str], float]:
        """(norm, eps as the summary writes it) -> the configured eps, exactly (the summary rounds 8/255)."""
        from invarbench.attacks import ThreatModel

        threats = [ThreatModel.parse(text) for text in self.config["threats"]]
        return {(threat.norm, f"{eps:g}"): eps for threat in threats for eps in threat.epsilons}

    def to_pandas(self) -> pd.DataFrame:
        """One row per model, norm, eps and perturbation attack (in cascade order): the robust accuracy
        after that attack (cumulative, as in the summary), with n and the clean accuracy."""
        import pandas as pd

        from invarbench.results import robustness_frame

        models, order = self.summary_dict["models"], self.summary_dict["attack_order"]
        frame = robustness_frame(models.items())
        frame = frame[frame["attack"].isin(order)]
        # Model, threat and eps in the run's order, attacks in cascade order.
        frame = frame.assign(
            group=frame.groupby(["model", "norm", "setting"], sort=False).ngroup(),
            position=frame["attack"].map(order.index),
        ).sort_values(["group", "position"], kind="stable")
        epsilons = self._epsilons()
        return pd.DataFrame(
            {
                "model": frame["model"],
                "dataset": frame["model"].map(lambda model: models[model]["dataset"]),
                "norm": frame["norm"],
                "eps": [
                    epsilons.get((norm, setting), float(setting))
                    for norm, setting in zip(frame["norm"], frame["setting"])
                ],
                "attack": frame["attack"],
                "robust_accuracy": frame["robust_accuracy"],
                "n": self.summary_dict["n"],
                "clean_accuracy": frame["model"].map(lambda model: models[model]["clean_accuracy"]),
            },
            columns=["model", "dataset", "norm", "eps", "attack", "robust_accuracy", "n", "clean_accuracy"],
        ).reset_index(drop=True)

    def invariance_pandas(self) -> pd.DataFrame:
        """One row per model, invariance attack and setting (norm and eps or budget) with the summary's
        invariance metrics; a 95% interval ``X_ci95`` becomes ``X_ci95_low`` and ``X_ci95_high``, the
        oracles one comma-joined string. Empty when no invariance attack ran."""
        import pandas as pd

        from invarbench.results import invariance_frame

        models = self.summary_dict["models"]
        frame = invariance_frame(models.items())
        if frame.empty:
            return pd.DataFrame(columns=["model", "dataset", "attack", "norm", "eps", "n"])
        frame.insert(1, "dataset", frame["model"].map(lambda model: models[model]["dataset"]))
        frame.insert(6, "n", self.summary_dict["n"])
        for column in [column for column in frame.columns if column.endswith("_ci95")]:
            position = frame.columns.get_loc(column)
            low, high = zip(*frame.pop(column))
            frame.insert(position, f"{column}_high", high)
            frame.insert(position, f"{column}_low", low)
        frame["oracle"] = frame["oracle"].map(",".join)
        return frame.drop(columns="setting")

    def __repr__(self) -> str:
        return f"Results({str(self.run_dir)!r}, models={list(self.summary_dict['models'])}, n={self.summary_dict['n']})"


def run_config(
    config: RunConfig,
    out: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    device: str = "auto",
    progress: bool = True,
    data_source: str | None = None,
    oracle=None,
    executor: ExecutorSettings | None = None,
) -> Results:
    """Run (or resume) ``config`` into ``out/NAME`` (default ``runs/``, NAME derived from the
    configuration) and return its results: what both ``evaluate`` and `invarbench run` do."""
    from invarbench.runner import run_benchmark

    outcome = run_benchmark(
        config,
        Path(out) if out is not None else DEFAULT_RUNS_DIR,
        name=name,
        device=device,
        progress=progress,
        data_source=data_source,
        oracle=oracle,
        executor=executor,
    )
    return Results.load(
        outcome.run_dir, summary=outcome.summary, jobs_run=outcome.jobs_run, jobs_resumed=outcome.jobs_resumed
    )


def model_spec(
    reference: str | os.PathLike,
    dataset: str | None = None,
    architecture: str | None = None,
    architecture_args: tuple = (),
) -> ModelSpec:
    """A model given by name or path: registered models and RobustBench names bring their data set; a
    checkpoint file is evaluated on ``dataset`` (default mnist)."""
    from invarbench.config import ModelSpec
    from invarbench.models.registry import declared_dataset

    reference = str(reference)
    declared = declared_dataset(reference)
    if declared is None:
        return ModelSpec(reference, dataset or "mnist", architecture, architecture_args)
    if dataset and dataset != declared:
        raise ConfigError(
            f"--dataset {dataset}: model {reference} is a {declared} model and is evaluated on {declared}; drop"
            " --dataset (dataset=) or evaluate it in a separate run"
        )
    return ModelSpec(reference, declared)


def _module_spec(
    module: nn.Module, dataset: str | None, key: str | None, bounds: tuple[float, float] | None, num_classes: int | None
) -> ModelSpec:
    """An in-memory ``nn.Module``, wrapped in a BenchmarkModel unless it is one."""
    from invarbench.config import ModelSpec
    from invarbench.datasets import load_dataset
    from invarbench.models import BenchmarkModel

    dataset = dataset or "mnist"
    if not isinstance(module, BenchmarkModel):
        bounds = bounds if bounds is not None else getattr(module, "bounds", None)
        if bounds is None:
            raise ConfigError(
                f"model {type(module).__name__} is a torch.nn.Module without input bounds; pass bounds=(low, high), the"
                f" range its {dataset} inputs lie in (e.g. bounds=(0.0, 1.0) for MNIST images), give the module a"
                " .bounds attribute, or wrap it in invarbench.models.BenchmarkModel"
            )
        classes = num_classes if num_classes is not None else load_dataset(dataset).num_classes
        module = BenchmarkModel(module, bounds=tuple(bounds), num_classes=classes, name=key or type(module).__name__)
    return ModelSpec.from_module(module, dataset, name=key or (module.name if module.name != "model" else None))


def _as_specs(model, dataset: str | None, bounds, num_classes) -> tuple[ModelSpec, ...]:
    from torch import nn

    if isinstance(model, Mapping):
        items = list(model.items())
    elif isinstance(model, (list, tuple)):
        items = [(None, item) for item in model]
    else:
        items = [(None, model)]
    specs = []
    for key, item in items:
        if isinstance(item, nn.Module):
            specs.append(_module_spec(item, dataset, key, bounds, num_classes))
        elif isinstance(item, (str, os.PathLike)):
            if key is not None:
                raise ConfigError(
                    f"model {item}: a registered model or checkpoint is known by its own name; pass it in a list, not"
                    f" under the key {key!r}"
                )
            specs.append(model_spec(item, dataset))
        else:
            raise ConfigError(
                f"model {item!r} is a {type(item).__name__}; pass a registered model name, a checkpoint path, a"
                " torch.nn.Module or a list of them"
            )
    return tuple(specs)


def evaluate(
    model,
    *,
    dataset: str | None = None,
    threats=None,
    attacks=("pgd",),
    n: int = 1000,
    seed: int = 0,
    oracle=None,
    out: str | os.PathLike | None = None,
    name: str | None = None,
    device: str = "auto",
    progress: bool = True,
    bounds: tuple[float, float] | None = None,
    num_classes: int | None = None,
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
) -> Results:
    """Evaluate ``model`` against perturbation and invariance attacks on the first ``n`` test points.

    ``model``: a registered model name, a checkpoint path (TorchScript, ONNX, ``robustbench:...``), a
    ``BenchmarkModel`` or any ``torch.nn.Module`` returning logits (then ``bounds=(low, high)`` of its
    inputs is needed unless it has a ``.bounds`` attribute; ``num_classes`` defaults to the data set's);
    a list of these, or a dict {key: model} to name in-memory models (default key: the class name).
    ``dataset``: for checkpoints and modules (default mnist); registered models bring theirs.
    ``threats``: ``"linf:0.1,0.3"`` strings or ThreatModel objects (default: the model's training
    threat model, else the data set's headline one). ``attacks``: in cascade order, ``"pgd"``,
    ``"pgd:steps=10"``, ``"autoattack:version=standard"``, ``"invariance-linf"`` or AttackSpec objects.
    ``oracle``: the oracle judging invariance candidates, a name (``invarbench oracle list``) or an
    oracle object. ``out``/``name``: the run directory ``out/name`` (default ``runs/`` and a name
    derived from the configuration, so the same call resumes).
    ``executor``: ``"local"`` (in this process) or ``"ray"`` (jobs as Ray tasks: on this machine with
    ``workers`` x ``threads_per_worker`` CPUs, or on the cluster at ``address``; see docs/cluster.md).
    """
    from invarbench.config import RunConfig
    from invarbench.executors import ExecutorSettings

    settings = ExecutorSettings(executor, address=address, workers=workers, threads_per_worker=threads_per_worker)
    specs = _as_specs(model, dataset, bounds, num_classes)
    config = RunConfig.build(
        specs,
        threats,
        attacks,
        n=n,
        seed=seed,
        oracle=oracle if isinstance(oracle, str) else None,
    )
    return run_config(
        config,
        out,
        name=name,
        device=device,
        progress=progress,
        oracle=None if isinstance(oracle, str) else oracle,
        executor=settings,
    )


__all__ = ["DEFAULT_RUNS_DIR", "Results", "evaluate", "format_summary", "format_table", "model_spec", "run_config"]
