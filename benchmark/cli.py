"""The ``invarbench`` command line. Exit codes: 0 ok, 1 failure, 2 usage error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from invarbench import __version__
from invarbench.errors import InvarbenchError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(value) for value in header]] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(str(value) for value in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _data_fetch(args: argparse.Namespace) -> int:
    from invarbench.datasets import fetch_mnist

    path = fetch_mnist(force=args.force)
    print(f"MNIST ready at {path}")
    return EXIT_OK


def _models_list(args: argparse.Namespace) -> int:
    from invarbench.models import ARCHITECTURES, get_card, list_models

    if args.architectures:
        print("\n".join(sorted(ARCHITECTURES)))
        return EXIT_OK
    header = ["model", "dataset", "architecture", "recipe", "trained against", "clean accuracy", "PGD robust accuracy", "invertible"]
    rows = []
    for name in list_models():
        card = get_card(name)
        threat = "none" if card.threat_model["norm"] == "none" else f"{card.threat_model['norm']} {card.threat_model['eps']:g}"
        robust = ", ".join(f"{100 * entry['value']:.1f}% ({entry['attack']} x{entry['restarts']}, {entry['norm']} {entry['eps']:g}, n={entry['n']})" for entry in card.robust_accuracy) or "-"
        rows.append([name, card.dataset, card.architecture, card.training["recipe"], threat, f"{100 * card.clean_accuracy:.1f}% (n={card.clean_accuracy_n})", robust, "yes" if card.invertible else "no"])
    print(format_markdown_table(header, rows) if args.markdown else format_table(header, rows))
    return EXIT_OK


def _models_show(args: argparse.Namespace) -> int:
    from invarbench.models import get_card

    print(get_card(args.name).to_toml(), end="")
    return EXIT_OK


def _models_train(args: argparse.Namespace) -> int:
    from invarbench.models import get_card
    from invarbench.models.training import train

    report = train(get_card(args.name), progress=not args.no_progress)
    card = report.card
    print(f"{card.name}: clean accuracy {100 * report.clean_accuracy:.2f}% on the first {report.n} test points; checkpoint {card.checkpoint_path} sha256 {card.checkpoint_sha256}; card updated ({report.seconds:.0f} s)")
    return EXIT_OK


def _models_evaluate(args: argparse.Namespace) -> int:
    from invarbench.models import get_card
    from invarbench.models.measure import measure_card

    card = get_card(args.name)
    measured = measure_card(card, restarts=args.restarts, seed=args.seed)
    print(f"{card.name}: clean accuracy {100 * measured.clean_accuracy:.2f}% on the first {measured.clean_accuracy_n} test points (card: {100 * card.clean_accuracy:.2f}%)")
    for entry in measured.robust_accuracy:
        print(f"{card.name}: {entry['attack']} {entry['norm']} eps {entry['eps']:g}, {entry['restarts']} restarts: robust accuracy {100 * entry['value']:.2f}% (n={entry['n']})")
    if args.update_card:
        measured.save()
        print(f"updated {measured.path}")
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from invarbench.quick import quick_benchmark

    rows = quick_benchmark(models=args.models, n=args.n, seed=args.seed, progress=not args.no_progress)
    print(format_table(["model", "dataset", "n", "clean", "threat", "robust"], [[row.model, row.dataset, row.n, f"{100 * row.clean_accuracy:.1f}%", row.threat, f"{100 * row.robust_accuracy:.1f}%"] for row in rows]))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invarbench", description="Adversarial robustness from both sides: perturbation and invariance attacks.")
    parser.add_argument("--version", action="version", version=f"invarbench {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="data sets", description="Fetch and inspect data sets.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = data_commands.add_parser("fetch", help="download a data set into $INVARBENCH_HOME", description="Download a data set into the cache ($INVARBENCH_HOME, default ~/.cache/invarbench).")
    fetch.add_argument("dataset", choices=["mnist"], help="data set to fetch (sklearn digits and spheres need no download; CIFAR-10 is read from a user path)")
    fetch.add_argument("--force", action="store_true", help="download again even if a verified copy is cached")
    fetch.set_defaults(handler=_data_fetch)

    models = commands.add_parser("models", help="the model registry", description="List, show and train registered models.")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = model_commands.add_parser("list", help="table of registered models", description="Table of registered models with their cards' key facts.")
    listing.add_argument("--architectures", action="store_true", help="list registered architectures instead")
    listing.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's zoo table)")
    listing.set_defaults(handler=_models_list)
    show = model_commands.add_parser("show", help="print a model card", description="Print a model's card (TOML).")
    show.add_argument("name", help="registered model name")
    show.set_defaults(handler=_models_show)
    train = model_commands.add_parser("train", help="train a model from its card", description="Reproduce a card's checkpoint with its training recipe; updates the card's sha256 and clean accuracy.")
    train.add_argument("name", help="registered model name")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(handler=_models_train)

    evaluate = model_commands.add_parser("evaluate", help="re-measure a card's figures", description="Measure clean accuracy and PGD robust accuracy at the card's threat model on the card's N test points.")
    evaluate.add_argument("name", help="registered model name")
    evaluate.add_argument("--restarts", type=int, default=5, help="PGD random restarts (default 5)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the first restart (default 0)")
    evaluate.add_argument("--update-card", action="store_true", help="write the measured figures into the card")
    evaluate.set_defaults(handler=_models_evaluate)

    bench = commands.add_parser("bench", help="quick benchmark of the reference zoo", description="Clean and PGD robust accuracy of zoo models on the first N test points, printed as a table.")
    bench.add_argument("models", nargs="*", help="registered model names (default: the whole zoo)")
    bench.add_argument("--n", type=int, default=100, help="number of test points, the first N in fixed order (default 100)")
    bench.add_argument("--seed", type=int, default=0, help="seed for PGD's random start (default 0)")
    bench.add_argument("--no-progress", action="store_true", help="hide progress output")
    bench.set_defaults(handler=_bench)
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
