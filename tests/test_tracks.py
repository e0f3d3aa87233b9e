"""Tracks as objects: a third track, defined here in one module and registered with its table, runs end to
end through the runner, its summary, a leaderboard entry, a regression check and the leaderboard's tables
and site, with nothing else changed."""

from typing import Any, ClassVar

import pandas as pd
import pytest
import torch

from invarbench.attacks import ATTACKS, BaseAttack, ThreatModel, register_attack
from invarbench.config import AttackSpec, ModelSpec, RunConfig
from invarbench.evaluation import predict
from invarbench.jobs import JobOutput
from invarbench.leaderboard.check import check_entries
from invarbench.leaderboard.entries import add_run, load_entries
from invarbench.leaderboard.site import build_site
from invarbench.leaderboard.tables import TABLES, Table, build_tables, register_tables
from invarbench.runner import run_benchmark
from invarbench.store import POINT_COLUMNS, as_records
from invarbench.tracks import INVARIANCE, PERTURBATION, TRACKS, Track, register_track, track_of


class GaussianNoise(BaseAttack):
    """Seeded Gaussian noise of standard deviation eps: does the model's prediction survive it?"""

    name = "test-gaussian-noise"
    track: ClassVar[str] = "noise"

    def __init__(self) -> None:
        """No options (an attack declares its options as keyword-only parameters here)."""

    def __call__(self, model, images: torch.Tensor, *, eps: float, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(images.shape, generator=generator) * eps
        return predict(model, (images + noise).clamp(*model.bounds))


class NoiseTrack(Track):
    """Robustness to random noise: one record per point and eps, whether the prediction flipped."""

    name = "noise"
    columns = {**POINT_COLUMNS, "flipped": "bool", "noisy_prediction": "int64"}
    records_file = "noise.parquet"
    order = ("model", "attack_index", "norm", "eps", "index")
    compared = ("flipped", "noisy_prediction")

    def execute(self, task, model, earlier, *, dataset=None, oracle=None, workspace=None) -> JobOutput:
        job = task.job
        frames = []
        for eps in job.threat.epsilons:
            # Seeded by the shard, not the job: an entry keeps its track's attacks only, so a check re-runs
            # them at other positions in the run, with other derived seeds.
            noisy = job.attack.create()(model, task.images, eps=eps, seed=job.start)
            frames.append(
                pd.DataFrame(
                    {
                        "model": job.model,
                        "index": torch.arange(job.start, job.stop).numpy(),
                        "label": task.labels.numpy(),
                        "clean_prediction": task.clean_predictions.numpy(),
                        "norm": job.threat.norm,
                        "eps": eps,
                        "attack": job.attack.name,
                        "attack_index": job.attack_index,
                        "ran": True,
                        "flipped": (noisy != task.clean_predictions).numpy(),
                        "noisy_prediction": noisy.numpy(),
                    }
                )
            )
        return JobOutput(as_records(pd.concat(frames, ignore_index=True), self.columns), 0.0)

    def summarize_model(self, records, config, model, clean_correct) -> dict[str, Any]:
        rows = records[records["model"] == model]
        return {"noise": {f"{eps:g}": float(group["flipped"].mean()) for eps, group in rows.groupby("eps")}}

    def entry_results(self, model_summary, summary, records, attacks, n) -> dict[str, Any]:
        return {"noise": model_summary["noise"]}

    def rates(self, group):
        yield "flip rate", *(float(group[f"flipped_{side}"].mean()) for side in ("stored", "new"))


def noise_table(entries, dataset, _entries_dir) -> pd.DataFrame:
    """The noise track's leaderboard table: each model's flip rate per eps."""
    rows = [
        {"model": entry["model"], **{f"flip rate {eps}": rate for eps, rate in entry["results"]["noise"].items()}}
        for entry in entries
        if entry["dataset"] == dataset and entry["track"] == "noise"
    ]
    return pd.DataFrame(rows)


@pytest.fixture
def noise_track():
    track = register_track(NoiseTrack())
    register_attack(GaussianNoise)
    register_tables(track.name, Table("noise", noise_table, title="noise track"))
    yield track
    del TRACKS[track.name], ATTACKS[GaussianNoise.name], TABLES[track.name]


def test_the_built_in_tracks_own_their_attacks():
    assert list(TRACKS) == ["perturbation", "invariance"]
    assert track_of(AttackSpec("pgd")) is PERTURBATION and track_of("invariance-linf") is INVARIANCE
    assert PERTURBATION.cascades and not INVARIANCE.cascades
    assert (PERTURBATION.records_file, INVARIANCE.records_file) == ("results.parquet", "invariance.parquet")


def test_a_third_track_runs_is_entered_and_checked_end_to_end(noise_track, tmp_path):
    model = ModelSpec("spheres-mlp-standard", "spheres")
    attacks = (AttackSpec("fgsm"), AttackSpec("test-gaussian-noise"))
    config = RunConfig((model,), (ThreatModel("linf", (0.05, 0.5)),), attacks, n=100, shard_size=50, seed=3)
    outcome = run_benchmark(config, tmp_path / "runs", name="noise", progress=False)

    summary = outcome.summary["models"]["spheres-mlp-standard"]
    assert set(summary["noise"]) == {"0.05", "0.5"} and summary["noise"]["0.05"] <= summary["noise"]["0.5"]
    assert summary["threats"]["linf"]["0.05"]["attacks"].keys() == {"fgsm"}, "the perturbation track is untouched"
    assert outcome.summary["attack_order"] == ["fgsm"]
    records = pd.read_parquet(tmp_path / "runs" / "noise" / "noise.parquet")
    assert len(records) == 200 and list(records.columns) == list(NoiseTrack.columns)

    entries_dir = tmp_path / "entries"
    entries_dir.mkdir()
    add_run(tmp_path / "runs" / "noise", entries_dir, galleries=False)
    entries = {entry["track"]: entry for entry in load_entries(entries_dir)}
    assert set(entries) == {"perturbation", "noise"}
    noise = entries["noise"]
    assert noise["results"]["noise"] == summary["noise"]
    assert [attack["name"] for attack in noise["settings"]["attacks"]] == ["test-gaussian-noise"]

    [result] = check_entries(entries_dir, names=["spheres-mlp-standard__spheres__noise"], points=50)
    assert result.passed, result.differences

    # Its table, registered beside the track, is built with the others and shown on the site's details page.
    written = build_tables(entries_dir, tmp_path / "out")
    assert tmp_path / "out" / "spheres-noise.md" in written and tmp_path / "out" / "spheres-perturbation.md" in written
    assert "flip rate 0.5" in (tmp_path / "out" / "spheres-noise.md").read_text()
    build_site(entries_dir, tmp_path / "site", tmp_path / "out")
    assert 'id="spheres-noise"' in (tmp_path / "site" / "details.html").read_text()
