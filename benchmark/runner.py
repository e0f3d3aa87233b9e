"""The runner: plan models x threat models x attacks x shards into jobs, run them, store the records.

Jobs are pure: a job's records depend only on the job (with its derived seed), the model, the shard's
points and, in the cascade, the records of the cheaper attacks on the same shard. So finished jobs can
be skipped on resume, and a distributed executor could run the same jobs elsewhere.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from invarbench import __version__
from invarbench.attacks import ATTACKS, ThreatModel, create_attack
from invarbench.attacks.invariance import InvarianceContext
from invarbench.attacks.oracles import ABSTAIN, default_oracle, get_oracle_definition, resolve_oracle
from invarbench.checks import CHECKS, check_compatible, check_model
from invarbench.datasets import invarbench_home, load_dataset
from invarbench.errors import ConfigError
from invarbench.evaluation import logits, predict, top_margins
from invarbench.models import BenchmarkModel, get_card, list_models, load_model
from invarbench.models.registry import checkpoint_sha256
from invarbench.preflight import check_models, check_run_dir, discarded_on_failure
from invarbench.statistics import wilson_interval
from invarbench.store import RECORD_COLUMNS, RunLock, RunStore, as_records, read_json, write_json
from tqdm.auto import tqdm

# Options the runner reads itself and does not pass to the attack: ``eps`` restricts an attack to some
# of the configured eps values (e.g. AutoAttack only at the headline ones), ``cascade=false`` runs it on
# every correctly classified point whatever the attacks before it found (a full minimum-norm curve).
RUNNER_OPTIONS = ("eps", "cascade")

# The field's headline threat models per data set, the first being the default of `invarbench run`.
HEADLINE_THREATS = {"mnist": ("linf:0.3", "l2:2.0"), "spheres": ("linf:0.025",), "digits": ("linf:0.1",), "cifar10": ("linf:0.03137254901960784", "l2:0.5")}  # CIFAR-10: 8/255
PACKAGES = ("torch", "numpy", "foolbox", "pyautoattack", "pandas", "pyarrow")


@dataclass(frozen=True)
class AttackSpec:
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> AttackSpec:
        """``NAME`` or ``NAME:key=value,key=value``; list values are joined with ``+``."""
        name, _, rest = spec.partition(":")
        options = []
        for item in filter(None, rest.split(",")):
            key, separator, value = item.partition("=")
            if not separator or not key:
                raise ConfigError(f"attack specification {spec!r}: options are key=value pairs, e.g. pgd:restarts=5,steps=100")
            options.append((key.strip(), _parse_value(value.strip())))
        attack = cls(name.strip(), tuple(options))
        attack.create()
        return attack

    def create(self):
        return create_attack(self.name, **{key: value for key, value in self.options if key not in RUNNER_OPTIONS})

    @property
    def only_epsilons(self) -> tuple[float, ...] | None:
        """The eps values this attack is restricted to (``eps=0.3+2.0``), or None for every configured one."""
        for key, value in self.options:
            if key == "eps":
                values = value if isinstance(value, list) else [value]
                try:
                    return tuple(float(item) for item in values)
                except (TypeError, ValueError) as error:
                    raise ConfigError(f"attack {self.label()!r}: eps= takes numbers joined by '+', e.g. autoattack:eps=0.3+2.0") from error
        return None

    @property
    def cascades(self) -> bool:
        """False for ``cascade=false``: the attack runs on every correctly classified point."""
        return dict(self.options).get("cascade", True) is not False

    @property
    def kind(self) -> str:
        return ATTACKS[self.name].kind

    def label(self) -> str:
        return self.name if not self.options else f"{self.name}:{','.join(f'{key}={value}' for key, value in self.options)}"


def _parse_value(text: str) -> Any:
    if "+" in text:
        return [_parse_value(part) for part in text.split("+")]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a registry name, a checkpoint path with what is needed to load it, or an
    in-memory model (``ModelSpec.from_module``, for ``invarbench.evaluate``)."""

    reference: str
    dataset: str
    architecture: str | None = None
    architecture_args: tuple[tuple[str, Any], ...] = ()
    #: An in-memory model, evaluated as it is (a copy: the caller's module is never moved or changed).
    module: BenchmarkModel | None = field(default=None, compare=False, repr=False)
    #: The key of an in-memory model.
    name: str | None = None

    @classmethod
    def from_module(cls, module: BenchmarkModel, dataset: str, name: str | None = None) -> ModelSpec:
        """An in-memory model, known by ``name`` (default: its network's class name)."""
        network = type(module.network)
        return cls(f"in-memory:{network.__module__}.{network.__qualname__}", dataset, module=module, name=name or network.__name__)

    @property
    def key(self) -> str:
        if self.module is not None:
            return self.name
        return self.reference if self.is_registered else Path(self.reference).stem

    @cached_property
    def is_registered(self) -> bool:
        return self.module is None and self.reference in list_models(role=None)

    def load(self, num_classes: int, bounds: tuple[float, float]) -> BenchmarkModel:
        if self.module is not None:
            return copy.deepcopy(self.module)
        if self.is_registered:
            return load_model(self.reference)
        args = dict(self.architecture_args)
        return load_model(self.reference, architecture=self.architecture, architecture_args=args, num_classes=num_classes, bounds=bounds)

    @property
    def invertible(self) -> bool:
        if self.module is not None:
            return self.module.invertible
        return get_card(self.reference).invertible if self.is_registered else self.architecture == "fi-revnet"

    def checkpoint_sha256(self) -> str:
        return self._module_sha256 if self.module is not None else checkpoint_sha256(self.reference)

    @cached_property
    def _module_sha256(self) -> str:
        """The sha256 of an in-memory model's state_dict as torch.save writes it."""
        buffer = io.BytesIO()
        torch.save(self.module.network.state_dict(), buffer)
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    def module_settings(self) -> dict[str, Any]:
        """What identifies an in-memory model in a run's configuration (nothing for other models, so
        their configurations and digests are as before): its weights' sha256, bounds, classes and
        normalisation."""
        if self.module is None:
            return {}
        module = self.module
        return {"checkpoint_sha256": self._module_sha256, "bounds": list(module.bounds), "num_classes": module.num_classes, "mean": module.mean.flatten().tolist(), "std": module.std.flatten().tolist()}


@dataclass(frozen=True)
class RunConfig:
    models: tuple[ModelSpec, ...]
    threats: tuple[ThreatModel, ...]
    attacks: tuple[AttackSpec, ...]
    n: int = 1000
    seed: int = 0
    shard_size: int = 100
    cascade: bool = True
    #: The oracle that judges invariance candidates, by name (``invarbench oracle list``, ``people:DB``);
    #: None = each data set's default.
    oracle: str | None = None

    def __post_init__(self):
        if not self.models:
            raise ConfigError("no model given; name a registered model (see `invarbench models list`) or a checkpoint path")
        if not self.attacks:
            raise ConfigError("no attack given; pass --attack NAME (e.g. --attack pgd)")
        if self.n < 1 or self.shard_size < 1:
            raise ConfigError(f"--n ({self.n}) and --shard-size ({self.shard_size}) must be positive")
        # Refused before anything is written: a misspelt oracle must not leave a run directory behind.
        if self.oracle and self.oracle.startswith("people:") and not Path(self.oracle[len("people:") :]).is_file():
            raise ConfigError(f"--oracle {self.oracle}: labels database {self.oracle[len('people:'):]} does not exist; create it with `invarbench label serve SOURCE --db FILE`")
        if self.oracle and not self.oracle.startswith(("people:", "exact:")):
            get_oracle_definition(self.oracle)
        keys = [model.key for model in self.models]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"models {keys} repeat a name; list each model once")

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": [{"reference": model.reference, "key": model.key, "dataset": model.dataset, "architecture": model.architecture, "architecture_args": dict(model.architecture_args), **model.module_settings()} for model in self.models],
            "threats": [str(threat) for threat in self.threats],
            "attacks": [{"name": attack.name, "options": dict(attack.options)} for attack in self.attacks],
            "n": self.n,
            "seed": self.seed,
            "shard_size": self.shard_size,
            "cascade": self.cascade,
            # Only when chosen, so that runs made before the option existed keep their digest and resume.
            **({"oracle": self.oracle} if self.oracle else {}),
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def default_name(self) -> str:
        first = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.models[0].key)
        more = f"+{len(self.models) - 1}" if len(self.models) > 1 else ""
        return f"{first}{more}-{self.digest()[:10]}"


@dataclass(frozen=True)
class Job:
    model: str
    threat: ThreatModel
    attack_index: int
    attack: AttackSpec
    shard: int
    start: int
    stop: int
    seed: int

    @property
    def id(self) -> str:
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model)
        return f"{model}__{self.threat.norm}__{self.attack_index:02d}-{self.attack.name}__shard{self.shard:05d}"


def derive_seed(*parts: object) -> int:
    """A seed that depends only on the job, never on the order jobs run in."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) % 2**31


def attack_threats(attack: AttackSpec, threats: tuple[ThreatModel, ...], invertible: bool) -> list[ThreatModel]:
    """The threat models an attack runs under: perturbation attacks under every configured one;
    invariance attacks under those their norm allows (exact metamers and l_0 budgets once, as their own
    pseudo-norm)."""
    if attack.kind != "invariance":
        only = attack.only_epsilons
        if only is None:
            return list(threats)
        restricted = [ThreatModel(threat.norm, tuple(eps for eps in threat.epsilons if any(abs(eps - wanted) < 1e-12 for wanted in only))) for threat in threats]
        unknown = [eps for eps in only if not any(abs(eps - value) < 1e-12 for threat in threats for value in threat.epsilons)]
        if unknown:
            raise ConfigError(f"attack {attack.label()!r} asks for eps {unknown}, which no --threat configures; add them to a --threat or drop them from eps=")
        return [threat for threat in restricted if threat.epsilons]
    instance = attack.create()
    selected: list[ThreatModel] = []
    for threat in threats:
        norm = instance.threat_norm(threat.norm, invertible)
        if norm is None:
            continue
        candidate = ThreatModel(norm, threat.epsilons) if norm == threat.norm else ThreatModel(norm, instance.budgets())
        if candidate not in selected:
            selected.append(candidate)
    return selected


def plan(config: RunConfig) -> list[Job]:
    jobs = []
    for model in config.models:
        for attack_index, attack in enumerate(config.attacks):
            for threat in attack_threats(attack, config.threats, model.invertible):
                for shard, start in enumerate(range(0, config.n, config.shard_size)):
                    seed = derive_seed(config.seed, model.key, threat, attack_index, attack.label(), shard)
                    jobs.append(Job(model.key, threat, attack_index, attack, shard, start, min(start + config.shard_size, config.n), seed))
    # Threat-major order within a model, as before invariance attacks existed: the cascade needs the
    # cheaper attacks of a shard first, which attack order within a threat gives.
    order = {(model.key, threat.norm): position for position, (model, threat) in enumerate((m, t) for m in config.models for t in config.threats)}
    return sorted(jobs, key=lambda job: (order.get((job.model, job.threat.norm), len(order)), job.model, job.attack_index, job.shard))


def _point_columns(job: Job, labels: torch.Tensor, clean_predictions: torch.Tensor, norm: str, eps: float) -> dict[str, Any]:
    """The columns every record starts with: which model, point, threat and attack it belongs to."""
    return {
        "model": job.model,
        "index": torch.arange(job.start, job.stop).numpy(),
        "label": labels.numpy(),
        "clean_prediction": clean_predictions.numpy(),
        "norm": norm,
        "eps": eps,
        "attack": job.attack.name,
        "attack_index": job.attack_index,
    }


def execute_job(job: Job, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, clean_predictions: torch.Tensor, earlier: pd.DataFrame | None, *, cascade: bool, workspace: Path | None = None) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Run one job on its shard; return its per-sample records (one row per point and eps) and the
    reliability warnings its attack raised.

    ``images``, ``labels`` and ``clean_predictions`` are the shard's; ``earlier`` holds the records of
    the cheaper attacks on the same shard and threat model (used by the cascade).
    """
    epsilons = job.threat.epsilons
    count = len(labels)
    active = (clean_predictions == labels).unsqueeze(0).repeat(len(epsilons), 1)
    if cascade and job.attack.cascades and earlier is not None and len(earlier):
        broken = earlier[earlier["success"].fillna(False).astype(bool)]
        for eps_index, eps in enumerate(epsilons):
            positions = broken.loc[broken["eps"] == eps, "index"].to_numpy() - job.start
            active[eps_index, torch.as_tensor(positions, dtype=torch.long)] = False
    success = torch.zeros(len(epsilons), count, dtype=torch.bool)
    norms = torch.full((len(epsilons), count), float("nan"))
    margins = torch.full((len(epsilons), count), float("nan"))
    predictions = torch.full((len(epsilons), count), -1, dtype=torch.long)
    points = active.any(dim=0).nonzero().flatten()
    warnings: tuple[str, ...] = ()
    if len(points):
        attack = job.attack.create()
        if workspace is not None and hasattr(attack, "workspace"):
            workspace.mkdir(parents=True, exist_ok=True)
            attack.workspace = workspace
        result = attack(model, images[points], labels[points], norm=job.threat.norm, epsilons=epsilons, seed=job.seed, active=active[:, points])
        success[:, points], norms[:, points], predictions[:, points] = result.success, result.norms, result.adversarial_predictions
        if result.margins is not None:
            margins[:, points] = result.margins.float()
        warnings = result.warnings
    rows = []
    for eps_index, eps in enumerate(epsilons):
        ran = active[eps_index]
        rows.append(
            pd.DataFrame(
                {
                    **_point_columns(job, labels, clean_predictions, job.threat.norm, eps),
                    "ran": ran.numpy(),
                    "success": pd.arrays.BooleanArray(success[eps_index].numpy(), ~ran.numpy()),
                    "adversarial_prediction": pd.arrays.IntegerArray(predictions[eps_index].numpy(), ~ran.numpy()),
                    "perturbation_norm": torch.where(ran, norms[eps_index], torch.tensor(float("nan"))).numpy(),
                    "logit_margin": torch.where(ran, margins[eps_index], torch.tensor(float("nan"))).numpy(),
                }
            )
        )
    return as_records(pd.concat(rows, ignore_index=True)), warnings


def execute_invariance_job(job: Job, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, clean_predictions: torch.Tensor, context: InvarianceContext) -> tuple[pd.DataFrame, torch.Tensor]:
    """Run one invariance job on its shard: per-candidate records and the candidate images."""
    attack = job.attack.create()
    attack.context = context
    result = attack(model, images, labels, norm=job.threat.norm, epsilons=job.threat.epsilons, seed=job.seed)
    model_margins, oracle_margins = decision_margins(model, context.oracle, result)
    rows = []
    for eps_index, eps in enumerate(result.epsilons):
        oracle_labels = result.oracle_labels[eps_index].numpy()
        rows.append(
            pd.DataFrame(
                {
                    **_point_columns(job, labels, clean_predictions, result.norm, eps),
                    "ran": True if result.ran is None else result.ran[eps_index].numpy(),
                    "target_class": pd.arrays.IntegerArray(result.target_classes[eps_index].numpy(), result.target_classes[eps_index].numpy() < 0),
                    "source_index": pd.arrays.IntegerArray(result.source_indices[eps_index].numpy(), result.source_indices[eps_index].numpy() < 0),
                    "oracle": result.oracle if result.oracles is None else result.oracles[eps_index],
                    "oracle_label": pd.arrays.IntegerArray(oracle_labels, oracle_labels == ABSTAIN),
                    "model_prediction": pd.arrays.IntegerArray(result.model_predictions[eps_index].numpy(), result.model_predictions[eps_index].numpy() < 0),
                    "perturbation_norm": result.perturbation_norms[eps_index].numpy(),
                    "logit_error": result.logit_errors[eps_index].numpy(),
                    "model_margin": model_margins[eps_index].numpy(),
                    "oracle_margin": pd.arrays.IntegerArray(oracle_margins[eps_index].numpy(), oracle_margins[eps_index].numpy() < 0),
                }
            )
        )
    return as_records(pd.concat(rows, ignore_index=True)), result.candidates


def decision_margins(model: torch.nn.Module, oracle, result) -> tuple[torch.Tensor, torch.Tensor]:
    """How firmly each candidate's outcome was decided: the attacked model's top-two logit gap, and the
    votes the oracle's outcome is away from changing (-1 where unknown: an oracle that does not vote,
    a per-set oracle, or an outcome the attack overrode)."""
    shape = result.candidates.shape[:2]
    flat = result.candidates.flatten(0, 1)
    model_margins = top_margins(logits(model, flat)).view(shape) if len(flat) else torch.zeros(shape)
    oracle_margins = torch.full(shape, -1, dtype=torch.long)
    if oracle is not None and result.oracles is None and result.oracle == oracle.name and len(flat):
        labels, margins = oracle.decide(flat)
        if margins is not None:
            oracle_margins = torch.where(labels.view(shape) == result.oracle_labels, margins.view(shape), oracle_margins)
    return model_margins, oracle_margins


def oracle_report(oracle, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The oracle on the unchanged evaluation points: how often it abstains, and how often it agrees
    with the data set's labels when it decides (the trust one can place in its invariance judgments)."""
    decided = oracle.label(images)
    judged = decided != ABSTAIN
    correct = int((decided[judged] == labels[judged]).sum())
    return {
        **oracle.describe(),
        "n": len(labels),
        "abstention_rate": 1 - int(judged.sum()) / len(labels),
        "accuracy_when_deciding": correct / int(judged.sum()) if judged.any() else None,
        "accuracy_when_deciding_ci95": wilson_interval(correct, int(judged.sum())),
    }


def invariance_metrics(rows: pd.DataFrame) -> dict[str, Any]:
    """Invariance accuracy and excessive-invariance rate over the candidates whose label the oracle
    says changed, with counts and 95% Wilson intervals."""
    rows = rows[rows["ran"]]
    judged = rows[rows["oracle_label"].notna()]
    changed = judged[judged["oracle_label"] != judged["label"]]
    agrees = int((changed["model_prediction"] == changed["oracle_label"]).sum())
    keeps = int((changed["model_prediction"] == changed["label"]).sum())
    logit_errors = rows["logit_error"].dropna()
    metrics = {
        "oracle": sorted(set(rows["oracle"].dropna())),
        "candidates": len(rows),
        "abstained": len(rows) - len(judged),
        "label_changed": len(changed),
        "label_changed_rate": len(changed) / len(judged) if len(judged) else 0.0,
        "model_agrees_with_oracle": agrees,
        "invariance_accuracy": agrees / len(changed) if len(changed) else None,
        "invariance_accuracy_ci95": wilson_interval(agrees, len(changed)),
        "model_keeps_original_label": keeps,
        "excessive_invariance_rate": keeps / len(changed) if len(changed) else None,
        "excessive_invariance_rate_ci95": wilson_interval(keeps, len(changed)),
        "median_perturbation_norm": float(rows["perturbation_norm"].median()) if len(rows) else None,
    }
    if len(logit_errors):
        metrics["max_logit_error"] = float(logit_errors.max())
    return metrics


def summarize(records: pd.DataFrame, config: RunConfig, models: dict[str, dict[str, Any]], invariance: pd.DataFrame | None = None) -> dict[str, Any]:
    """Clean accuracy, cumulative robust accuracy after each perturbation attack (in cascade order),
    worst case; invariance metrics per invariance attack and eps."""
    perturbation = [(index, attack) for index, attack in enumerate(config.attacks) if attack.kind != "invariance"]
    summary: dict[str, Any] = {"n": config.n, "seed": config.seed, "cascade": config.cascade, "attack_order": [attack.label() for _, attack in perturbation], "models": {}}
    for model, info in models.items():
        model_records = records[records["model"] == model]
        clean_correct = info["clean_correct"]
        entry = {**info, "clean_accuracy": clean_correct / config.n, "threats": {}}
        for threat in config.threats if perturbation else ():
            per_eps = {}
            for eps in threat.epsilons:
                selected = model_records[(model_records["norm"] == threat.norm) & (model_records["eps"] == eps)]
                broken = set()
                attacks = {}
                for attack_index, attack in perturbation:
                    only = attack.only_epsilons
                    if only is not None and not any(abs(eps - wanted) < 1e-12 for wanted in only):
                        continue
                    rows = selected[selected["attack_index"] == attack_index]
                    newly = set(rows.loc[rows["success"].fillna(False).astype(bool), "index"].tolist())
                    attacked = int(rows["ran"].sum())
                    broken |= newly
                    robust = clean_correct - len(broken)
                    attacks[attack.label()] = {
                        "attacked": attacked,
                        "broken": len(newly),
                        "robust": robust,
                        "robust_accuracy": robust / config.n,
                        "attack_success_rate": len(newly) / attacked if attacked else 0.0,
                    }
                robust = clean_correct - len(broken)
                per_eps[f"{eps:g}"] = {"attacks": attacks, "worst_case": {"robust": robust, "robust_accuracy": robust / config.n}}
            entry["threats"][threat.norm] = per_eps
        if invariance is not None and len(invariance):
            model_rows = invariance[invariance["model"] == model]
            entry["invariance"] = {}
            for attack_index, attack in enumerate(config.attacks):
                rows = model_rows[model_rows["attack_index"] == attack_index]
                if len(rows):
                    entry["invariance"][attack.label()] = {f"{norm}:{eps:g}": invariance_metrics(group) for (norm, eps), group in rows.groupby(["norm", "eps"], sort=True)}
        summary["models"][model] = entry
    return summary


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


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "invarbench": __version__}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


@dataclass
class RunOutcome:
    run_dir: Path
    summary: dict[str, Any]
    jobs_run: int = 0
    jobs_resumed: int = 0
    timings: dict[str, dict[str, float]] = field(default_factory=dict)


def run_benchmark(config: RunConfig, out: Path, *, name: str | None = None, device: str = "auto", progress: bool = True, data_source: str | None = None, oracle=None) -> RunOutcome:
    """Run (or resume) the configured evaluation into ``out/NAME`` and return its summary.

    ``oracle`` judges invariance candidates; by default the data set's own (see ``default_oracle``).
    """
    run_dir = Path(out) / (name or config.default_name())
    store = RunStore(run_dir)
    torch_device = resolve_device(device)
    on_disk = tuple(spec for spec in config.models if spec.module is None)
    if on_disk:  # in-memory models need no loading checks
        check_models(replace(config, models=on_disk))
    with RunLock(run_dir) as lock, discarded_on_failure(store, created=run_dir in lock.created):
        store.remove_stale_temporaries()
        check_run_dir(store, config)
        manifest = {
            "config": config.to_dict(),
            "config_sha256": config.digest(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "status": "running",
            "versions": package_versions(),
            "device": str(torch_device),
            "threads": torch.get_num_threads(),
            "cpu": cpu_description(),
            "platform": platform.platform(),
            "command": " ".join(sys.argv),
        }
        if store.manifest_path.exists():
            manifest["created"] = read_json(store.manifest_path).get("created", manifest["created"])
        write_json(store.manifest_path, manifest)

        jobs = plan(config)
        outcome = RunOutcome(run_dir, {})
        all_records: list[pd.DataFrame] = []
        invariance_records: list[pd.DataFrame] = []
        oracles: dict[tuple, Any] = {}
        oracle_reports: dict[str, dict[str, Any]] = {}
        model_info: dict[str, dict[str, Any]] = {}
        datasets: dict[tuple, Any] = {}
        tallies: dict[tuple, list[int]] = {}
        bar = tqdm(total=sum(job.stop - job.start for job in jobs), desc="invarbench run", unit="pt", disable=not progress, dynamic_ncols=True)
        for spec in config.models:
            card = get_card(spec.reference) if spec.is_registered else None
            dataset_options = card.dataset_options if card else {}
            key = (spec.dataset, tuple(sorted(dataset_options.items())))
            if key not in datasets:
                datasets[key] = load_dataset(spec.dataset, source=data_source, **dataset_options) if spec.dataset in ("mnist", "cifar10") else load_dataset(spec.dataset, **dataset_options)
            dataset = datasets[key]
            images, labels = dataset.evaluation_subset(config.n)
            model = spec.load(dataset.num_classes, dataset.bounds).to(torch_device).eval()
            check_compatible(model, dataset, source=spec.reference)
            input_size = images[0].numel()
            for threat in config.threats:
                threat.check_against_bounds(model.bounds, input_size, source=spec.key)
            flags = check_model(model, images[: min(100, config.n)], labels[: min(100, config.n)], num_classes=dataset.num_classes, source=spec.reference)
            clean_predictions = predict(model, images)
            model_info[spec.key] = {
                "reference": spec.reference,
                "dataset": spec.dataset,
                "checkpoint_sha256": spec.checkpoint_sha256(),
                "clean_correct": int((clean_predictions == labels).sum()),
                "checks": flags,
                "warnings": [CHECKS[check] for check, raised in flags.items() if raised],
            }
            if key not in oracles and any(attack.kind == "invariance" and ATTACKS[attack.name].needs_oracle for attack in config.attacks):
                oracles[key] = oracle or (resolve_oracle(config.oracle, dataset) if config.oracle else default_oracle(dataset))
                oracle_reports[oracles[key].name] = oracle_report(oracles[key], images, labels)
            timings: dict[str, float] = {}
            # Per attack, each distinct warning its jobs raised (in order), e.g. AutoAttack's Square check.
            attack_warnings: dict[str, dict[str, None]] = {}
            shard_records: dict[tuple, list[pd.DataFrame]] = {}
            for job in (job for job in jobs if job.model == spec.key):
                # Per norm, not per threat: an attack restricted to some eps (eps=...) still sees what the
                # attacks before it found at those eps.
                shard_key = (job.threat.norm, job.shard)
                if store.job_done(job.id):
                    records, seconds = store.read_job(job.id)
                    outcome.jobs_resumed += 1
                elif job.attack.kind == "invariance":
                    started = time.perf_counter()
                    window = slice(job.start, job.stop)
                    context = InvarianceContext(dataset, oracles.get(key), torch.arange(job.start, job.stop), cache_dir=invarbench_home() / "cache" / "invariance")
                    records, candidates = execute_invariance_job(job, model, images[window], labels[window], clean_predictions[window], context)
                    seconds = time.perf_counter() - started
                    store.write_candidates(job.id, candidates)
                    store.write_job(job.id, records, seconds=seconds)
                    outcome.jobs_run += 1
                else:
                    earlier = pd.concat(shard_records[shard_key]) if shard_records.get(shard_key) else None
                    started = time.perf_counter()
                    window = slice(job.start, job.stop)
                    workspace = run_dir / "state" / job.id
                    records, warnings = execute_job(job, model, images[window], labels[window], clean_predictions[window], earlier, cascade=config.cascade, workspace=workspace)
                    seconds = time.perf_counter() - started
                    store.write_job(job.id, records, seconds=seconds, warnings=warnings)
                    # An attack's resume state is only needed until its job's records are on disk.
                    shutil.rmtree(workspace, ignore_errors=True)
                    outcome.jobs_run += 1
                timings[job.attack.label()] = timings.get(job.attack.label(), 0.0) + seconds
                for warning in store.job_warnings(job.id):
                    attack_warnings.setdefault(job.attack.label(), {})[f"{job.threat.norm} {warning}"] = None
                bar.update(job.stop - job.start)
                if job.attack.kind == "invariance":
                    invariance_records.append(records)
                    judged = records[records["oracle_label"].notna() & (records["oracle_label"] != records["label"])]
                    bar.set_postfix_str(f"{spec.key} {job.attack.name} label changed {len(judged)}/{len(records)}", refresh=False)
                    continue
                shard_records.setdefault(shard_key, []).append(records)
                all_records.append(records)
                robust_so_far = _tally(tallies, job, records)
                bar.set_postfix_str(f"{spec.key} {job.threat.norm} {job.attack.name} robust {robust_so_far}", refresh=False)
            outcome.timings[spec.key] = timings
            model_info[spec.key]["attack_warnings"] = {label: list(messages) for label, messages in attack_warnings.items()}
        bar.close()

        records = as_records(pd.concat(all_records, ignore_index=True)) if all_records else as_records(pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in RECORD_COLUMNS.items()}))
        records = records.sort_values(["model", "norm", "eps", "attack_index", "index"], kind="stable")
        invariance = None
        if invariance_records:
            invariance = as_records(pd.concat(invariance_records, ignore_index=True)).sort_values(["model", "attack_index", "norm", "eps", "index"], kind="stable")
        store.write_results(records, invariance)
        outcome.summary = summarize(records, config, model_info, invariance)
        if oracle_reports:
            outcome.summary["oracles"] = oracle_reports
        write_json(store.summary_path, outcome.summary)
        manifest.update(status="complete", finished=datetime.now(UTC).isoformat(timespec="seconds"), timings_seconds=outcome.timings, checkpoint_sha256={key: info["checkpoint_sha256"] for key, info in model_info.items()})
        write_json(store.manifest_path, manifest)
    return outcome


def _tally(tallies: dict[tuple, list[int]], job: Job, records: pd.DataFrame) -> str:
    """Add the job's outcome at its largest eps to the running tally of its attack; describe the tally."""
    rows = records[(records["eps"] == job.threat.epsilons[-1]) & records["ran"]]
    tally = tallies.setdefault((job.model, str(job.threat), job.attack_index), [0, 0])
    tally[0] += len(rows)
    tally[1] += int(rows["success"].sum())
    attacked, broken = tally
    return f"{1 - broken / attacked:.1%} of {attacked}" if attacked else "-"


def default_threats(specs: tuple[ModelSpec, ...]) -> tuple[ThreatModel, ...]:
    """The threat models a model was trained against, else its data set's headline threat model."""
    threats = []
    for spec in specs:
        card = get_card(spec.reference) if spec.is_registered else None
        if card and card.threat_model["norm"] != "none":
            candidate = ThreatModel(card.threat_model["norm"], (float(card.threat_model["eps"]),))
        else:
            candidate = ThreatModel.parse(HEADLINE_THREATS.get(spec.dataset, ("linf:0.3",))[0])
        merged = next((threat for threat in threats if threat.norm == candidate.norm), None)
        if merged is None:
            threats.append(candidate)
        else:
            threats[threats.index(merged)] = ThreatModel(merged.norm, tuple(sorted(set(merged.epsilons) | set(candidate.epsilons))))
    return tuple(threats)


def merge_threats(threats: list[ThreatModel]) -> tuple[ThreatModel, ...]:
    """One threat model per norm: ``--threat linf:0.1 --threat linf:0.3`` is ``linf:0.1,0.3``."""
    merged: dict[str, set[float]] = {}
    for threat in threats:
        merged.setdefault(threat.norm, set()).update(threat.epsilons)
    return tuple(ThreatModel(norm, tuple(sorted(epsilons))) for norm, epsilons in merged.items())


__all__ = ["AttackSpec", "Job", "ModelSpec", "RunConfig", "default_threats", "execute_job", "merge_threats", "plan", "run_benchmark", "summarize"]
