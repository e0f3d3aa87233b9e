"""The Ray executor's speed-up: one `invarbench run` of mnist-cnn-standard and mnist-cnn-pgd-linf-0.3
(l_inf 0.1,0.2,0.3,0.4, PGD, the first N test points) with the local executor at 2 threads, and with
Ray at 1 worker x 1 thread and at 2 workers x 1 thread; then a simulated table for 8 and 64 workers.

Each configuration runs as its own `invarbench run` into a fresh folder. Times: the whole command
(imports, Ray start, model checks) and its jobs (the manifest's ``jobs_wall_seconds``: from the first
job submitted to the last one stored). Speed-ups are of the jobs' wall time; the records of the three
runs must be identical. The simulation replays the measured job times (Ray, 1 worker x 1 thread) on P
workers by list scheduling in plan order: a job starts once a worker is free and the earlier attacks of
its shard are stored, and the driver stores one finished job at a time, taking the measured per-job
time per job (the 1-worker run's ``driver_seconds`` per job: writing the records, progress) for each.

    python benchmarks/ray_scaling.py [--n 1000] [--out benchmarks/results/ray_scaling.json]

Before the runs it measures the machine's own ceiling for 2 workers: the same bare single-thread
forward+backward loop on mnist-cnn-pgd-linf-0.3, once alone and as two processes at once
(``2 x alone / together``). Two processes share the caches and memory bandwidth (on this 2-core VM they
slow each other: the ceiling is printed and stored), so no executor with one thread per worker can beat that ratio here.

Measure on an otherwise idle machine with at least 2 cores: other processes on the cores distort
every ratio.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from invarbench.environment import measurement_header

MODELS = ("mnist-cnn-standard", "mnist-cnn-pgd-linf-0.3")
CONFIGURATIONS = {
    "local, 2 threads": ["--executor", "local", "--threads-per-worker", "2"],
    "ray, 1 worker x 1 thread": ["--executor", "ray", "--workers", "1", "--threads-per-worker", "1"],
    "ray, 2 workers x 1 thread": ["--executor", "ray", "--workers", "2", "--threads-per-worker", "1"],
}
SIMULATED_WORKERS = (1, 2, 8, 64)
# A worker's work without any executor: 20 PGD-like forward+backward passes on 500 points, one thread;
# prints its own time (after the imports and model load).
BARE_LOOP = """
import time, torch, torch.nn.functional as F
from invarbench.datasets import load_dataset
from invarbench.models import get_card, load_model
torch.set_num_threads(1)
card = get_card("mnist-cnn-pgd-linf-0.3")
x, y = load_dataset(card.dataset, **card.dataset_options).evaluation_subset(500)
model = load_model("mnist-cnn-pgd-linf-0.3").requires_grad_(False)
started = time.perf_counter()
for _ in range(20):
    x = x.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    x = (x + 0.01 * gradient.sign()).clamp(0, 1)
print(time.perf_counter() - started)
"""


def two_process_ceiling(repeats: int = 2) -> dict:
    """The bare loop alone and as two processes at once (best of ``repeats`` each): the speed-up two
    single-thread workers can reach on this machine, whatever runs them."""

    def launch() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", BARE_LOOP],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    alone, together = [], []
    for _ in range(repeats):
        process = launch()
        alone.append(float(process.communicate()[0]))
        pair = [launch(), launch()]
        together.append(max(float(process.communicate()[0]) for process in pair))
    return {"alone_seconds": min(alone), "together_seconds": min(together), "ceiling": 2 * min(alone) / min(together)}


def run(label: str, options: list[str], n: int, shard_size: int, attack: str, out: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "invarbench.cli",
        "run",
        *MODELS,
        "--threat",
        "linf:0.1,0.2,0.3,0.4",
        "--attack",
        attack,
        "--n",
        str(n),
        "--shard-size",
        str(shard_size),
        "--out",
        str(out),
        "--name",
        "run",
        "--no-progress",
        *options,
    ]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        sys.exit(f"{label}: `{' '.join(command)}` failed:\n{finished.stderr[-3000:]}")
    manifest = json.loads((out / "run" / "manifest.json").read_text())
    jobs = {}
    for path in sorted((out / "run" / "jobs").glob("*.parquet")):
        jobs[path.stem] = float(pq.read_schema(path).metadata[b"invarbench.seconds"])
    return {
        "label": label,
        "command": " ".join(["invarbench", *command[3:]]),
        "seconds": seconds,
        "jobs_wall_seconds": manifest["jobs_wall_seconds"],
        "driver_seconds": manifest["driver_seconds"],
        "job_seconds": jobs,
        "executor": manifest["executor"],
    }


def chains(job_ids: list[str]) -> dict[str, str | None]:
    """Each job's predecessor in its shard's cascade (the previous attack of its model, norm and shard),
    from the job ids MODEL__NORM__NN-ATTACK__shardSSSSS; None for the first attack."""
    previous: dict[tuple, str] = {}
    after = {}
    for job_id in sorted(
        job_ids,
        key=lambda job_id: (job_id.split("__")[0], job_id.split("__")[1], job_id.split("__")[3], job_id.split("__")[2]),
    ):
        model, norm, _, shard = job_id.split("__")
        after[job_id] = previous.get((model, norm, shard))
        previous[(model, norm, shard)] = job_id
    return after


def simulate(job_seconds: dict[str, float], workers: int, overhead: float) -> dict:
    """List scheduling of the jobs on ``workers`` workers, in plan order (attack, then shard), with one
    driver that stores one finished job at a time for ``overhead`` seconds; a worker takes its next job
    once the driver has stored its last one. Returns the makespan and what bounds it."""
    after = chains(list(job_seconds))
    pending = sorted(job_seconds, key=lambda job_id: job_id.split("__"))
    stored: dict[str, float] = {}
    idle = list(range(workers))
    events: list[tuple[float, int, str, int]] = []  # (time, 0 finished / 1 stored, job, worker)
    driver = 0.0

    def assign(now: float) -> None:
        for job_id in list(pending):
            if not idle:
                return
            if after[job_id] is None or after[job_id] in stored:
                heapq.heappush(events, (now + job_seconds[job_id], 0, job_id, idle.pop()))
                pending.remove(job_id)

    assign(0.0)
    while events:
        now, kind, job_id, worker = heapq.heappop(events)
        if kind == 0:
            driver = max(driver, now) + overhead
            heapq.heappush(events, (driver, 1, job_id, worker))
        else:
            stored[job_id] = now
            idle.append(worker)
            assign(now)
    makespan = max(stored.values())
    critical = 0.0
    for job_id in job_seconds:  # the longest cascade chain, with the driver's time per job
        chain_time, current = 0.0, job_id
        while current is not None:
            chain_time += job_seconds[current] + overhead
            current = after[current]
        critical = max(critical, chain_time)
    # Lower bounds of the makespan: the work divided among the workers; the driver storing every job one
    # at a time (after the shortest job); the longest job; the longest cascade chain (a shard's attacks in turn).
    bounds = {
        "workers": sum(job_seconds.values()) / workers,
        "driver": min(job_seconds.values()) + overhead * len(job_seconds),
        "longest job": max(job_seconds.values()) + overhead,
        "cascade": critical,
    }
    if critical <= bounds["longest job"] + 1e-9:
        del bounds["cascade"]  # one attack per shard: no chain longer than a job
    limit = max(bounds, key=bounds.get)  # the first of equal ones: workers, driver, longest job, cascade
    if len(job_seconds) < workers:
        limit += f" ({len(job_seconds)} jobs for {workers} workers)"
    return {"workers": workers, "makespan_seconds": makespan, "bounds_seconds": bounds, "limited_by": limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="test points (default 1000)")
    parser.add_argument("--shard-size", type=int, default=100, help="points per job (default 100)")
    parser.add_argument(
        "--attack",
        default="pgd",
        help="the attack (default pgd; e.g. pgd:steps=5 for a quick check that the script runs)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "ray_scaling.json",
        help="JSON to write (default benchmarks/results/ray_scaling.json)",
    )
    args = parser.parse_args()
    print("measuring two bare single-thread processes against one ...", file=sys.stderr, flush=True)
    ceiling = two_process_ceiling()
    print(
        f"machine ceiling for 2 single-thread workers: {ceiling['ceiling']:.2f}x (the bare loop"
        f" {ceiling['alone_seconds']:.1f} s alone, {ceiling['together_seconds']:.1f} s as two processes at once)"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="ray-scaling-") as scratch:
        for index, (label, options) in enumerate(CONFIGURATIONS.items()):
            print(f"running {label} ...", file=sys.stderr, flush=True)
            results.append(run(label, options, args.n, args.shard_size, args.attack, Path(scratch) / str(index)))
        frames = [
            pd.read_parquet(Path(scratch) / str(index) / "run" / "results.parquet") for index in range(len(results))
        ]
    local, one, two = results
    # Same threads per job: identical records. The local run's 2 threads may round convolutions otherwise.
    identical = frames[1].equals(frames[2])
    columns = ["success", "adversarial_prediction"]
    outcome_differences = int(
        (frames[0][columns].astype("Int64").fillna(-1) != frames[1][columns].astype("Int64").fillna(-1))
        .any(axis=1)
        .sum()
    )
    print(
        f"\n{len(one['job_seconds'])} jobs ({', '.join(MODELS)}; l_inf 0.1-0.4, {args.attack}; n={args.n},"
        f" {args.shard_size} points per job)"
    )
    threads = (
        "identical"
        if frames[0].equals(frames[1])
        else f"{outcome_differences} of {len(frames[0])} outcomes differ (float rounding of 2 vs 1 threads)"
    )
    print(
        f"records of 1 and 2 Ray workers identical: {'yes' if identical else 'NO'}; local at 2 threads vs Ray at 1"
        f" thread: {threads}\n"
    )
    print(
        "| configuration | whole command (s) | jobs wall (s) | summed job times (s) | jobs speed-up vs 1 Ray worker |"
    )
    print("|---|---|---|---|---|")
    for result in results:
        print(
            f"| {result['label']} | {result['seconds']:.1f} | {result['jobs_wall_seconds']:.1f} |"
            f" {sum(result['job_seconds'].values()):.1f} |"
            f" {one['jobs_wall_seconds'] / result['jobs_wall_seconds']:.2f}x |"
        )
    speedup = one["jobs_wall_seconds"] / two["jobs_wall_seconds"]
    versus_local = local["jobs_wall_seconds"] / two["jobs_wall_seconds"]
    print(
        f"\n2 Ray workers vs 1: {speedup:.2f}x (efficiency {speedup / 2:.2f} per worker); 2 Ray workers vs local at 2"
        f" threads: {versus_local:.2f}x"
    )
    overhead = one["driver_seconds"] / len(one["job_seconds"])
    startup = one["jobs_wall_seconds"] - sum(one["job_seconds"].values()) - one["driver_seconds"]
    print(
        f"1 Ray worker: jobs wall {one['jobs_wall_seconds']:.1f} s = jobs {sum(one['job_seconds'].values()):.1f} s +"
        f" driver storing {one['driver_seconds']:.2f} s + {startup:.1f} s start-up and dispatch (worker process, model"
        " load)"
    )
    simulated = [simulate(one["job_seconds"], workers, overhead) for workers in SIMULATED_WORKERS]
    base = simulated[0]["makespan_seconds"]
    print(
        f"\nSimulated (measured 1-worker job times; driver overhead {overhead * 1000:.0f} ms per job, one job stored at"
        " a time):\n"
    )
    print("| workers | makespan (s) | speed-up | efficiency | limited by |")
    print("|---|---|---|---|---|")
    for row in simulated:
        print(
            f"| {row['workers']} | {row['makespan_seconds']:.1f} | {base / row['makespan_seconds']:.2f}x |"
            f" {base / row['makespan_seconds'] / row['workers']:.2f} | {row['limited_by']} |"
        )
    print(
        "\nlimited by: workers = the jobs' work divided among them; longest job = fewer jobs than workers, the run"
        " waits for its slowest shard (smaller --shard-size gives more jobs);"
    )
    print("cascade = a shard's attacks run one after another; driver = the driver stores one finished job at a time.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        **measurement_header("ray_scaling", threads=1),
        "n": args.n,
        "shard_size": args.shard_size,
        "attack": args.attack,
        "models": list(MODELS),
        "records_identical_ray_1_vs_2_workers": identical,
        "outcome_differences_local_2_threads_vs_ray_1_thread": outcome_differences,
        "runs": results,
        "speedup_2_vs_1_workers": speedup,
        "speedup_2_workers_vs_local_2_threads": versus_local,
        "two_process_ceiling": ceiling,
        "driver_overhead_seconds_per_job": overhead,
        "ray_startup_seconds": startup,
        "simulated": simulated,
        "cpu_count": os.cpu_count(),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
