"""The speed tables of docs/speed.md, generated from the benchmarks' JSON outputs (never typed by hand).

Reads what the benchmark scripts wrote into ``benchmarks/results/`` (pgd_sweep.json, pgd_overhead.json,
aa_fast.json, ray_scaling.json, leaderboard_cost.json, checkpoint_weight.json, labelling_load.json; a missing
one is left out; further measurements of one benchmark as STEM-WHAT.json, e.g. aa_fast-l2.json, each add a
table), writes the Markdown tables of each benchmark as ``benchmarks/results/NAME.md`` and replaces the blocks
between ``<!-- benchmarks:NAME -->`` markers in the pages given (default docs/speed.md, docs/models.md and
docs/labelling.md). A table names the command, date, threads and CPU of the run it comes from, so a stale
figure shows as such.

    python benchmarks/report.py [--results benchmarks/results] [--page docs/speed.md ...]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from invarbench.io import atomic_write_text
from invarbench.leaderboard.tables import sync_readme

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _origin(report: dict) -> str:
    processor = (
        f"GPU {report['gpu']}, torch {report.get('torch', '?')}; CPU {report.get('cpu', '?')}"
        if report.get("gpu")
        else report.get("cpu") or report.get("machine", "")
    )
    where = ", ".join(
        part
        for part in (
            f"{report['threads']} thread{'s' if report['threads'] != 1 else ''}" if "threads" in report else "",
            processor,
        )
        if part
    )
    # Scripts named by the path they were run from (device_check.py's parts: an absolute path) are shown from the
    # repository's root.
    shown = re.sub(r"[^ ]*/(benchmarks/[^ ]+)", r"\1", report.get("command", ""))
    command = f"`{shown}`, " if shown else ""
    return f"Measured by {command}{report.get('date', 'date not recorded')[:10]} ({where})."


def _pgd_sweep(report: dict) -> str:
    lines = [
        (
            f"{_origin(report)} First {report['n']} MNIST test points, l_inf"
            f" {', '.join(f'{eps:g}' for eps in report['epsilons'])} in one call, {report['steps']} steps, best time of"
            f" {report['repeats']} interleaved repeats."
        ),
        "",
        (
            "| model | Foolbox LinfPGD (s) | invarbench pgd (s) | speed-up | target | robust accuracy invarbench -"
            " Foolbox, per eps (points) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for model, result in report["models"].items():
        differences = " / ".join(
            f"{100 * (ours - theirs):+.1f}"
            for ours, theirs in zip(result["robust_accuracy"]["invarbench"], result["robust_accuracy"]["foolbox"])
        )
        target = f">= {result['target_ratio']:g}x" if result.get("target_ratio") else "-"
        lines.append(
            f"| {model} | {result['seconds']['foolbox']:.1f} | {result['seconds']['invarbench']:.1f} |"
            f" {result['ratio']:.2f}x | {target} | {differences} |"
        )
    return "\n".join(lines) + "\n"


def _pgd_overhead(report: dict) -> str:
    measure = report.get("ratio_measure", f"best wall time of {report['repeats']}")
    return (
        "\n".join(
            [
                (
                    f"{_origin(report)} `{report['model']}`, batch {report['batch']}, l_inf {report['eps']:g},"
                    f" {report['steps']} steps, {report['repeats']} repeats; ratio: {measure}."
                ),
                "",
                "| invarbench pgd, best wall (s) | bare forward+backward loop, best wall (s) | ratio | target |",
                "|---|---|---|---|",
                (
                    f"| {report['seconds']['invarbench']:.2f} | {report['seconds']['bare']:.2f} | {report['ratio']:.3f}"
                    f" | <= {report['target_ratio']:g} |"
                ),
            ]
        )
        + "\n"
    )


def _passes(row: dict, attack: str) -> dict | None:
    """A row's counted forward and backward passes (in points). aa-fast's own Square ran its queries through a
    traced copy of the model that the pass counter did not see until ``square_counted``: its recorded
    queries per point (one forward pass each, the start included) are added."""
    counted = row.get(f"{attack}_passes")
    if not counted or attack != "aa_fast" or row["aa_fast_options"].get("square_counted", True):
        return counted
    if row["aa_fast_options"].get("square_implementation") != "invarbench":
        return counted
    square = sum(
        sum(entry.get("queries", []))
        for entry in row["aa_fast_options"]["stage_statistics"]
        if entry["stage"] == "square"
    )
    return {**counted, "forward": counted["forward"] + square}


def _aa_fast_overall(reports: list[dict]) -> str:
    """The targets over every measurement with counted passes: the summed speed-up, the smallest speed-up
    where AutoAttack took more than 60 s, and the points broken only by AutoAttack."""
    rows = [row for report in reports if "start" in report for row in report["rows"] if row.get("autoattack_passes")]
    if not rows:
        return ""
    reference = sum(row["autoattack_seconds"] for row in rows)
    fast = sum(row["aa_fast_seconds"] for row in rows)
    slow = [row["speedup"] for row in rows if row["autoattack_seconds"] > 60]
    missed = sorted(
        f"{row['model']} {row['threat']}: {', '.join(map(str, row['only_autoattack_broke']))}"
        for row in rows
        if row["only_autoattack_broke"]
    )
    points = sum(row["n"] for row in rows)
    forward = [sum(_passes(row, attack)["forward"] for row in rows) for attack in ("autoattack", "aa_fast")]
    backward = [sum(_passes(row, attack)["backward"] for row in rows) for attack in ("autoattack", "aa_fast")]
    return (
        f"Over the {len(rows)} measured pairs above ({points} points in all): AutoAttack {reference:.0f} s, aa-fast"
        f" {fast:.0f} s, summed speed-up {reference / fast:.2f}x (target >= 5);"
        f" smallest speed-up where AutoAttack took more than 60 s: {min(slow):.2f}x (target >= 3);"
        f" forward passes {forward[0] / forward[1]:.2f}x and backward passes {backward[0] / backward[1]:.2f}x fewer;"
        f" points broken only by AutoAttack: {'; '.join(missed) if missed else 'none'} (target: none).\n"
    )


def _aa_fast(report: dict) -> str:
    start = report.get("start", 0)
    block = f"First {report['n']}" if not start else f"Test points {start} to {start + report['n'] - 1} ({report['n']})"

    def passes(row: dict, attack: str) -> str:
        counted = _passes(row, attack)
        return f"{counted['forward']:,} / {counted['backward']:,}" if counted else "not counted"

    lines = [
        (
            f"{_origin(report)} {block} MNIST test points, seed {report['seed']}, pyautoattack"
            f" {report['pyautoattack']} standard as the reference."
        ),
        "",
        (
            "| model | threat | AutoAttack robust | aa-fast robust | difference (points) | AutoAttack (s) | aa-fast (s)"
            " | speed-up | broken only by AutoAttack | broken only by aa-fast | AutoAttack passes (forward / backward)"
            " | aa-fast passes (forward / backward) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | {row['threat']} | {100 * row['autoattack_robust_accuracy']:.1f}% |"
            f" {100 * row['aa_fast_robust_accuracy']:.1f}% | {row['difference_points']:+.1f} |"
            f" {row['autoattack_seconds']:.1f} | {row['aa_fast_seconds']:.1f} | {row['speedup']:.2f}x |"
            f" {', '.join(map(str, row['only_autoattack_broke'])) or '-'} |"
            f" {', '.join(map(str, row['only_aa_fast_broke'])) or '-'} |"
            f" {passes(row, 'autoattack')} | {passes(row, 'aa_fast')} |"
        )
    if len(report["rows"]) > 1:
        reference = sum(row["autoattack_seconds"] for row in report["rows"])
        fast = sum(row["aa_fast_seconds"] for row in report["rows"])
        lines += [
            "",
            f"Summed over these pairs: AutoAttack {reference:.1f} s, aa-fast {fast:.1f} s, {reference / fast:.2f}x.",
        ]
    return "\n".join(lines) + "\n"


def _ray_scaling(report: dict) -> str:
    lines = [
        (
            f"{_origin(report)} `invarbench run {' '.join(report['models'])} --threat linf:0.1,0.2,0.3,0.4 --attack"
            f" {report['attack']} --n {report['n']} --shard-size {report['shard_size']}` on {report['cpu_count']}"
            " cores."
        ),
        "",
        "| executor | wall time of the jobs (s) | whole command (s) |",
        "|---|---|---|",
    ]
    lines += [f"| {run['label']} | {run['jobs_wall_seconds']:.1f} | {run['seconds']:.1f} |" for run in report["runs"]]
    lines += [
        "",
        f"2 Ray workers against 1: {report['speedup_2_vs_1_workers']:.2f}x (target >= 1.8); against the local executor"
        f" at 2 threads: {report['speedup_2_workers_vs_local_2_threads']:.2f}x (target >= 1). Records of 1 and 2"
        f" workers identical: {'yes' if report['records_identical_ray_1_vs_2_workers'] else 'no'}. Driver time per job"
        f" {1000 * report['driver_overhead_seconds_per_job']:.0f} ms."
        + (
            " The machine's own ceiling, two bare single-thread processes against one:"
            f" {report['two_process_ceiling']['ceiling']:.2f}x."
            if "two_process_ceiling" in report
            else ""
        ),
        "",
        "Simulated from the measured job times (list scheduling in the cascade's order, the driver's time per job):",
        "",
        "| workers | makespan (s) | limited by |",
        "|---|---|---|",
    ]
    lines += [
        f"| {row['workers']} | {row['makespan_seconds']:.1f} | {row['limited_by']} |" for row in report["simulated"]
    ]
    return "\n".join(lines) + "\n"


def _checkpoint_weight(report: dict) -> str:
    mb = lambda size: f"{size / 1e6:.2f}"  # noqa: E731
    lines = [
        (
            f"{_origin(report)} Float16: the weights rounded to float16 and loaded back as float32, predictions on the"
            f" first {report['n']} test points of each model's data set."
        ),
        "",
        (
            "| checkpoint | role | MB | lzma (MB) | float16 (MB) | float16: predictions changed | float16: largest"
            " logit change |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | {row['role']} | {mb(row['bytes'])} | {mb(row['lzma_bytes'])} |"
            f" {mb(row['float16_bytes'])} | {row['float16_prediction_changes']} of {row['points']} |"
            f" {row['float16_max_logit_change']:.2g} |"
        )
    totals = report["totals"]
    lines.append(
        f"| **total** | | **{mb(totals['bytes'])}** | **{mb(totals['lzma_bytes'])}** |"
        f" **{mb(totals['float16_bytes'])}** | | |"
    )
    return "\n".join(lines) + "\n"


def _leaderboard_cost(report: dict) -> str:
    runs = {
        label: min(measured, key=lambda run: run["jobs_wall_seconds"]) for label, measured in report["runs"].items()
    }
    threats = sorted(
        runs["stored"]["worst_case"],
        key=lambda threat: (threat.partition(":")[0] != "linf", float(threat.partition(":")[2])),
    )
    repeats = len(report["runs"]["stored"])
    lines = [
        (
            f"{_origin(report)} `{report['model']}`, first {report['n']} test points, Ray with {report['workers']}"
            f" workers x 1 thread (best of {repeats} alternating run{'s' if repeats != 1 else ''} each). Stored: the"
            f" entry's settings of {report['stored_settings']['date'][:10]}"
            f" ({', '.join(report['stored_settings']['attacks'])}; a `pgd` of then runs as `foolbox-pgd`); make"
            f" leaderboard: `{' '.join(report['make_leaderboard_arguments'])}`."
        ),
        "",
        "| settings | jobs wall (s) | summed job time per attack (s) | "
        + " | ".join(f"worst case {threat}" for threat in threats)
        + " |",
        "|---|---|---|" + "---|" * len(threats),
    ]
    for label, run in runs.items():
        per_attack = ", ".join(f"{attack} {seconds:.1f}" for attack, seconds in run["attack_seconds"].items())
        lines.append(
            f"| {label} | {run['jobs_wall_seconds']:.1f} | {per_attack} | "
            + " | ".join(f"{100 * run['worst_case'][threat]:.1f}%" for threat in threats)
            + " |"
        )
    lines += ["", f"make leaderboard takes {report['ratio']:.2f}x the stored settings' time on this model."]
    return "\n".join(lines) + "\n"


def _leaderboard_time(report: dict) -> str:
    """Per model and track: the jobs' wall time and each attack's summed job time; the whole command's time."""
    rows = report["rows"]
    executor = rows[0]["executor"] if rows else {}
    used = {row["settings"] for row in rows}
    settings = "; ".join(
        f"{variable} `{' '.join(words)}`" for variable, words in report["arguments"].items() if variable in used
    )
    lines = [
        f"{_origin(report)} `time make leaderboard` on the models {', '.join(f'`{m}`' for m in report['models'])}:"
        f" {executor.get('name', '?')} with {executor.get('workers', '?')} workers x"
        f" {executor.get('threads_per_worker', '?')} thread(s). The Makefile's settings: {settings}.",
        "",
        "| model | track | settings | jobs wall (s) | summed job time per attack (s) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        per_attack = ", ".join(f"{attack} {seconds:.0f}" for attack, seconds in row["attack_seconds"].items())
        lines.append(
            f"| `{row['model']}` | {row['track']} | {row['settings']} | {row['jobs_wall_seconds']:.0f} | {per_attack} |"
        )
    jobs = sum(row["jobs_wall_seconds"] for row in rows)
    wall = report["wall_seconds"]
    lines += [
        "",
        f"Whole command: {wall:.0f} s ({wall / 3600:.2f} h; target at most 2 h, aim 1.5 h), of which the runs' jobs"
        f" {jobs:.0f} s; the rest is loading, storing, entries, tables and site.",
    ]
    return "\n".join(lines) + "\n"


def _device_tests(report: dict) -> str:
    if report.get("status") == "error":
        return f"The cuda tests did not run: {report['error']}\n"
    counts = {}
    for test in report["tests"]:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    origin = (
        _origin(report)
        if "date" in report
        else "From `make device-check` on a lent GPU machine (this file records no machine header)."
    )
    lines = [
        f"{origin} `pytest -m cuda` ({report['mode']}): "
        + ", ".join(f"{count} {outcome}" for outcome, count in sorted(counts.items()))
        + f", {report['seconds']:.0f} s in all.",
        "",
        "| test | outcome | seconds | message |",
        "|---|---|---|---|",
    ]
    for test in report["tests"]:
        # The assertion, without pytest's explanation of how each side was computed.
        message = " ".join(re.split(r"\s\+\s+where ", test["message"])[0].split())[:240].replace("|", "\\|")
        lines.append(
            f"| `{test['test'].rpartition('::')[2]}` | {test['outcome']} | {test['seconds']:.1f} | {message} |"
        )
    return "\n".join(lines) + "\n"


def _invariance_speed(report: dict) -> str:
    attacks = report["attacks"]
    lines = [
        (
            f"{_origin(report)} `{report['model']}`, {report['threat']}, the invariance track's attacks"
            f" ({', '.join(attacks)}), oracle judged on the run's device; CPU runs use {report['cpu_threads']} threads."
        ),
        "",
        "| device | points | whole run (s) | "
        + " | ".join(f"{attack} (s)" for attack in attacks)
        + " | per point (ms) |",
        "|---|---|---|" + "---|" * len(attacks) + "---|",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['device']} | {run['n']} | {run['seconds']:.1f} | "
            + " | ".join(f"{run['attack_seconds'].get(attack, float('nan')):.1f}" for attack in attacks)
            + f" | {1000 * run['seconds'] / run['n']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _labelling_load(report: dict) -> str:
    return (
        "\n".join(
            [
                (
                    f"{_origin(report)} {report['annotators']} annotators at once, each labelling all {report['items']}"
                    f" items ({report['control_items']} control items) through the HTTP API of `invarbench label serve`"
                    f" on 127.0.0.1, on a keep-alive connection of their own, on {report['cores']} cores shared with"
                    f" the clients (load average {report['load_average_before']:.1f} from other work when it started)."
                    f" Every acknowledged label was stored exactly once, as acknowledged: {report['labels_stored']}"
                    " labels."
                ),
                "",
                "| requests | count | p50 (ms) | p99 (ms) |",
                "|---|---|---|---|",
                *(
                    f"| {what} | {report[key]['requests']} | {report[key]['p50_ms']:.1f} |"
                    f" {report[key]['p99_ms']:.1f} |"
                    for what, key in (
                        ("label (`POST /api/label`)", "label_requests"),
                        ("image (`GET /image/ID.png`)", "image_requests"),
                    )
                ),
                "",
                (
                    f"Throughput: {report['labels_per_second']:.0f} labels stored per second ({report['labels_stored']}"
                    f" labels in {report['seconds']:.1f} s)."
                ),
            ]
        )
        + "\n"
    )


# JSON stem -> (table name, script that writes it, renderer)
RENDERERS = {
    "pgd_sweep": ("speed-pgd-sweep", "pgd_sweep.py", _pgd_sweep),
    "pgd_overhead": ("speed-pgd-overhead", "pgd_overhead.py", _pgd_overhead),
    "aa_fast": ("speed-aa-fast", "aa_fast_vs_autoattack.py", _aa_fast),
    "ray_scaling": ("speed-ray-scaling", "ray_scaling.py", _ray_scaling),
    "leaderboard_cost": ("speed-leaderboard-cost", "leaderboard_cost.py", _leaderboard_cost),
    "leaderboard_time": ("speed-leaderboard-time", "leaderboard_time.py --wall SECONDS", _leaderboard_time),
    "checkpoint_weight": ("checkpoint-weight", "checkpoint_weight.py", _checkpoint_weight),
    "device_tests": ("device-tests", "device_check.py", _device_tests),
    "invariance_speed": ("speed-invariance", "device_check.py", _invariance_speed),
    "labelling_load": ("labelling-load", "labelling_load.py", _labelling_load),
}
#: Measurements made on a lent GPU machine (``STEM-gpu.json``, by benchmarks/device_check.py) go to a
#: table of their own, ``NAME-gpu``, beside the CPU's: these benchmarks', and device_check.py's own.
GPU_SUFFIX = "gpu"
MEASURED_ON_GPU = ("pgd_sweep", "aa_fast")
#: device_check.py's own measurements, made on the GPU machine only: their tables keep their names.
GPU_ONLY = ("device_tests", "invariance_speed")


#: Benchmarks whose measurements also get one summary over all of them (after their tables).
OVERALL = {"aa_fast": _aa_fast_overall}


def _rendered(renderer, paths: list[Path], overall=None) -> str:
    reports = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    text = "\n".join(renderer(report) for report in reports)
    summary = overall(reports) if overall and reports else ""
    return f"{text}\n{summary}" if summary else text


def render(results: Path = RESULTS) -> dict[str, str]:
    """Table name -> Markdown for every benchmark (a line saying how to measure it where ``results``
    holds no output of it)."""
    tables = {}
    for stem, (name, script, renderer) in RENDERERS.items():
        # A benchmark's main output, then any further measurements of it (``STEM-WHAT.json``), each its own table.
        paths = [path for path in (results / f"{stem}.json", *sorted(results.glob(f"{stem}-*.json"))) if path.exists()]
        on_gpu = [path for path in paths if path.stem == f"{stem}-{GPU_SUFFIX}"]
        on_cpu = [path for path in paths if path not in on_gpu]
        if stem not in GPU_ONLY:
            tables[name] = (
                _rendered(renderer, on_cpu, OVERALL.get(stem))
                or f"Not measured yet: run `python benchmarks/{script}`.\n"
            )
        if stem in GPU_ONLY or stem in MEASURED_ON_GPU:
            tables[name if stem in GPU_ONLY else f"{name}-{GPU_SUFFIX}"] = (
                _rendered(renderer, on_gpu)
                or "Not measured on a GPU yet: run `make device-check` on a lent GPU machine"
                " (docs/speed.md says how).\n"
            )
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--page",
        type=Path,
        action="append",
        help="page whose benchmarks blocks to replace (default docs/speed.md, docs/models.md and docs/labelling.md)",
    )
    args = parser.parse_args()
    for name, table in render(args.results).items():
        atomic_write_text(args.results / f"{name}.md", table)
        print(f"wrote {args.results / f'{name}.md'}")
    for page in args.page or [HERE.parent / "docs" / name for name in ("speed.md", "models.md", "labelling.md")]:
        print(f"{page}: replaced {', '.join(sync_readme(page, args.results, prefix='benchmarks')) or 'nothing'}")


if __name__ == "__main__":
    main()
