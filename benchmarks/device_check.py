"""The CUDA path tested and timed on a lent GPU machine, in one run that fits the lease (issue 25).

Run by ``benchmarks/device_check.sh`` (``make device-check``), which installs the carried wheels and
MNIST there first. Each part runs in its own process under its own time limit, so a part that fails or
hangs costs only its own share, and writes its JSON into ``--out`` as soon as it ends:

- ``device_tests-gpu.json``: every test marked ``cuda`` (``pytest -m cuda``), its outcome and time;
- ``pgd_sweep-gpu.json``: invarbench's ``pgd`` eps sweep against Foolbox's LinfPGD (benchmarks/pgd_sweep.py);
- ``aa_fast-gpu.json``: ``aa-fast`` against the official AutoAttack on two robust models at l_inf 0.3
  (benchmarks/aa_fast_vs_autoattack.py);
- ``invariance_speed-gpu.json``: the invariance track of ``make leaderboard`` on one model, on the GPU
  and on the machine's CPU cores.

``benchmarks/report.py`` turns them into the tables of docs/speed.md. ``--dry-run`` does all of it on
this CPU on a few points, with the cuda tests only collected (``--rehearse`` runs them with the CPU in
the GPU's place), after checking that what travels to the device machine stays under its 64 MiB.

    python benchmarks/device_check.py --out DIR [--dry-run [--rehearse]] [--parts tests pgd_sweep ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What the device tool sends: the working tree (tracked and untracked files git does not ignore) and the carried paths.
TRAVEL_LIMIT_BYTES = 64 * 2**20
#: Ignored folder of the carried files, written by `make device-wheels` (benchmarks/device_wheels.py).
CARRIED = ROOT / ".device"
#: What `make device-wheels` carries (wheels and packed MNIST), measured when it was written: the
#: budget kept free where .device has not been made (a fresh clone, CI).
CARRIED_ESTIMATE_BYTES = 13_100_000
#: Wall-time limit of each part on the GPU machine, seconds: with the installs, at most 8 minutes.
PART_LIMITS = {"tests": 240, "pgd_sweep": 50, "aa_fast": 130, "invariance_speed": 100}
#: The dry run's limits: the same parts on this CPU on a few points.
DRY_RUN_LIMITS = {"tests": 60, "pgd_sweep": 60, "aa_fast": 120, "invariance_speed": 120}
N_POINTS = 1000
CUDA_TESTS = "tests/test_cuda.py"
#: Per-test limit where pytest-timeout is installed (the GPU machine's image has it).
TEST_LIMIT_SECONDS = 100
AA_MODELS = ("mnist-cnn-pgd-linf-0.3", "mnist-cnn-pgd-linf-0.4")
INVARIANCE_MODEL = "mnist-cnn-pgd-linf-0.3"


def travelling_bytes() -> dict[str, int]:
    """Bytes the device tool would send: the working tree that git lists, and the carried folder."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    tree = sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())
    carried = sum(path.stat().st_size for path in CARRIED.rglob("*") if path.is_file()) if CARRIED.exists() else 0
    return {"tree": tree, "carried": carried}


def check_size() -> dict:
    sizes = travelling_bytes()
    carried = sizes["carried"] or CARRIED_ESTIMATE_BYTES
    total = sizes["tree"] + carried
    report = {
        "tree_bytes": sizes["tree"],
        "carried_bytes": sizes["carried"],
        "carried_measured": bool(sizes["carried"]),
        "total_bytes": total,
        "limit_bytes": TRAVEL_LIMIT_BYTES,
    }
    where = "measured in .device" if sizes["carried"] else "estimated; run `make device-wheels` to measure"
    print(
        f"travels: tree {sizes['tree'] / 2**20:.1f} MiB + carried {carried / 2**20:.1f} MiB ({where}) ="
        f" {total / 2**20:.1f} MiB of {TRAVEL_LIMIT_BYTES / 2**20:.0f} MiB",
        flush=True,
    )
    if total > TRAVEL_LIMIT_BYTES:
        raise SystemExit(
            f"what travels to the device machine weighs {total / 2**20:.1f} MiB, over its"
            f" {TRAVEL_LIMIT_BYTES / 2**20:.0f} MiB: untracked files git does not ignore travel too (git status), and"
            " so does .device"
        )
    return report


# --------------------------------------------------------------------------------------------- parts


def part_tests(out: Path, device: str, dry_run: bool, rehearse: bool, save) -> dict:
    """Every cuda test: run on the GPU; on a dry run only collected (or, rehearsing, run with the CPU in the GPU's
    place)."""
    from invarbench.environment import measurement_header

    junit = out / "device_tests.xml"
    # Only the module that holds them: collecting tests/ would import every test module, and some import
    # packages that do not travel (fastapi, ray, playwright); tests/test_device_check.py keeps them there.
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rA",
        f"--junitxml={junit}",
        CUDA_TESTS,
    ]
    environment = dict(os.environ)
    if dry_run and not rehearse:
        command.append("--collect-only")
    elif importlib.util.find_spec("pytest_timeout"):
        # One test that hangs fails alone instead of taking the part's whole limit (and the others' outcomes) with it.
        command.append(f"--timeout={TEST_LIMIT_SECONDS}")
    if rehearse:
        environment["INVARBENCH_CUDA_TESTS_ON"] = "cpu"
    started = time.perf_counter()
    log = out / "device_tests.log"
    with open(log, "w") as handle:
        completed = subprocess.run(
            command, cwd=ROOT, env=environment, stdout=handle, stderr=subprocess.STDOUT, text=True
        )
    output = log.read_text()
    print(output[-4000:], flush=True)
    tests = []
    if junit.exists():
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            tests.append(
                {
                    "test": f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}",
                    "outcome": "passed" if problem is None else problem.tag,
                    "seconds": float(case.get("time", 0.0)),
                    "message": "" if problem is None else problem.get("message", "")[:1000],
                    "details": "" if problem is None else (problem.text or "")[-3000:],
                }
            )
        junit.unlink()
    if dry_run and not rehearse:
        log.unlink()
        collected = [line for line in output.splitlines() if "::" in line]
        tests = [{"test": line.strip(), "outcome": "collected", "seconds": 0.0, "message": ""} for line in collected]
    return {
        **measurement_header("device_tests", device=device),
        "exit_code": completed.returncode,
        "seconds": time.perf_counter() - started,
        "tests": tests,
        "mode": "collected" if dry_run and not rehearse else ("rehearsed on the cpu" if rehearse else device),
    }


def part_pgd_sweep(out: Path, device: str, dry_run: bool, rehearse: bool, save) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pgd_sweep import TARGET_RATIO, sweep

    models = list(TARGET_RATIO)[:1] if dry_run else list(TARGET_RATIO)
    return sweep(
        models,
        10 if dry_run else N_POINTS,
        [0.1, 0.3] if dry_run else [0.1, 0.2, 0.3, 0.4],
        5 if dry_run else 40,
        1 if dry_run else 2,
        device=device,
    )


def part_aa_fast(out: Path, device: str, dry_run: bool, rehearse: bool, save) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pyautoattack
    import torch
    from aa_fast_vs_autoattack import compare

    from invarbench.attacks import ThreatModel
    from invarbench.datasets import load_dataset
    from invarbench.environment import measurement_header

    n = 4 if dry_run else N_POINTS
    images, labels = load_dataset("mnist").evaluation_subset(n)
    # The dry run: a model whose points fall at once, a few Square queries, AutoAttack's APGD-CE alone.
    fast_options = {"square_queries": 20} if dry_run else {}
    reference_options = {"version": "custom", "attacks": ["apgd-ce"]} if dry_run else None
    report = {
        **measurement_header("aa_fast_vs_autoattack", device=device),
        "n": n,
        "seed": 0,
        "torch": torch.__version__,
        "pyautoattack": pyautoattack.__version__,
        "rows": [],
    }
    for position, model in enumerate(["mnist-cnn-standard"] if dry_run else AA_MODELS):
        row = compare(
            model,
            ThreatModel.parse("linf:0.3"),
            images,
            labels,
            fast_options=fast_options,
            seed=0,
            fast_first=position % 2 == 1,
            device=device,
            reference_options=reference_options,
        )
        report["rows"].append(row)
        save(report)
        print(
            f"{model}: AutoAttack {row['autoattack_seconds']:.1f} s, aa-fast {row['aa_fast_seconds']:.1f} s, robust"
            f" {row['autoattack_robust_accuracy']:.3f} / {row['aa_fast_robust_accuracy']:.3f}",
            flush=True,
        )
    return report


def part_invariance_speed(out: Path, device: str, dry_run: bool, rehearse: bool, save) -> dict:
    """The invariance track's attacks as `make leaderboard` runs them (its INVARIANCE settings without
    the PGD that only sits beside them), on ``device`` and on this machine's CPU cores."""
    import tempfile

    import torch

    from invarbench.attacks import ThreatModel
    from invarbench.config import AttackSpec, ModelSpec, RunConfig
    from invarbench.environment import measurement_header
    from invarbench.runner import run_benchmark

    # The dry run leaves out the l_0 search, whose affine copies of the training set take most of a minute on a
    # 2-core CPU.
    attacks = ("invariance-linf", "metameric:steps=5") if dry_run else ("invariance-linf", "invariance-l0", "metameric")
    # The device on 100 points, then on all N, then the CPU cores on 100 points. Each run is kept as it ends,
    # so the part's limit cuts off only the run it stops.
    runs = [("cpu", 2)] if dry_run else [(device, 100), (device, N_POINTS), ("cpu", 100)]
    report = {
        **measurement_header("invariance_speed", device=device),
        "model": INVARIANCE_MODEL,
        "threat": "linf:0.3,0.4",
        "attacks": list(attacks),
        "cpu_threads": torch.get_num_threads(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        for where, n in runs:
            config = RunConfig(
                (ModelSpec(INVARIANCE_MODEL, "mnist"),),
                (ThreatModel("linf", (0.3, 0.4)),),
                tuple(AttackSpec.parse(spec) for spec in attacks),
                n=n,
                shard_size=min(n, 500),
                seed=0,
            )
            started = time.perf_counter()
            outcome = run_benchmark(config, Path(scratch), name=f"{where}-{n}", device=where, progress=False)
            seconds = time.perf_counter() - started
            run = {
                "device": where,
                "n": n,
                "seconds": seconds,
                "attack_seconds": outcome.timings[INVARIANCE_MODEL],
                "invariance": outcome.summary["models"][INVARIANCE_MODEL].get("invariance", {}),
            }
            report["runs"].append(run)
            save(report)
            print(
                f"invariance track on {where}, {n} points: {seconds:.1f} s"
                f" ({', '.join(f'{attack} {value:.1f}' for attack, value in run['attack_seconds'].items())})",
                flush=True,
            )
    return report


PARTS = {
    "tests": part_tests,
    "pgd_sweep": part_pgd_sweep,
    "aa_fast": part_aa_fast,
    "invariance_speed": part_invariance_speed,
}


def run_part(name: str, out: Path, device: str, dry_run: bool, rehearse: bool) -> None:
    """One part in this process: its JSON is written whatever happens (an error is recorded in it)."""
    stem = "device_tests" if name == "tests" else name
    path = out / f"{stem}-{'dry-run' if dry_run else 'gpu'}.json"
    started = time.perf_counter()

    def save(partial: dict) -> None:
        """What the part has measured so far, kept should it be stopped at its limit."""
        path.write_text(
            json.dumps({**partial, "status": "partial", "part_seconds": time.perf_counter() - started}, indent=1) + "\n"
        )

    try:
        report = PARTS[name](out, device, dry_run, rehearse, save)
        report["status"] = "ok" if report.get("exit_code", 0) == 0 else "tests failed"
    except (
        Exception
    ) as error:  # recorded, not raised: the other parts still run and this one's failure comes back as data
        import traceback

        traceback.print_exc()
        report = {"status": "error", "error": f"{type(error).__name__}: {error}"[:4000]}
    report["part_seconds"] = time.perf_counter() - started
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[{name}] {report['status']} in {report['part_seconds']:.1f} s -> {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the JSON files (on the device machine: $OUT)"
    )
    parser.add_argument("--dry-run", action="store_true", help="on this CPU, a few points, cuda tests only collected")
    parser.add_argument(
        "--rehearse", action="store_true", help="with --dry-run: run the cuda tests with the CPU in the GPU's place"
    )
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:
        run_part(args.part, args.out, device, args.dry_run, args.rehearse)
        return
    # The size is checked where the tree leaves from: the device machine receives no .git to list it with.
    size = check_size() if args.dry_run else {}
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("torch sees no CUDA device here; on a machine without a GPU run with --dry-run")
    limits = DRY_RUN_LIMITS if args.dry_run else PART_LIMITS
    summary = {"dry_run": args.dry_run, "size": size, "parts": {}}
    for name in args.parts:
        started = time.perf_counter()
        command = [
            sys.executable,
            str(Path(__file__).relative_to(ROOT)),
            "--out",
            str(args.out),
            "--part",
            name,
            *(["--dry-run"] if args.dry_run else []),
            *(["--rehearse"] if args.rehearse else []),
        ]
        try:
            code = subprocess.run(
                command, cwd=ROOT, timeout=limits[name] * (6 if args.rehearse and name == "tests" else 1)
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timed out"
            print(f"[{name}] stopped at its limit of {limits[name]} s", flush=True)
        summary["parts"][name] = {"exit": code, "seconds": time.perf_counter() - started}
    print(json.dumps(summary, indent=1))
    failed = [name for name, part in summary["parts"].items() if part["exit"] != 0]
    statuses = {path.name: json.loads(path.read_text()).get("status") for path in args.out.glob("*.json")}
    errors = [name for name, status in statuses.items() if status != "ok"]
    if failed or errors:
        raise SystemExit(
            f"parts that did not finish: {', '.join(failed) or '-'}; parts that recorded an error:"
            f" {', '.join(errors) or '-'}"
        )


if __name__ == "__main__":
    main()
