"""Leaderboard tables from stored entries: one per data set and track, as Markdown, CSV, LaTeX and HTML
(plus the plots of ``plots.py``).

Built only from ``leaderboard/entries/``; building twice from the same entries gives the same bytes.
Perturbation tables are ranked by worst-case robust accuracy at the data set's first headline threat
model (a compact ``DATASET-perturbation-summary.md`` keeps only the worst case per threat); invariance
tables list every invariance attack and setting with its oracle, counts and 95% intervals.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from invarbench.attacks.autoattack import reliability_flag
from invarbench.config import RUNNER_OPTIONS, AttackSpec
from invarbench.io import atomic_write_text
from invarbench.leaderboard import OUTPUT_DIR
from invarbench.leaderboard.baseline import comparison_frame, headline_pairs, load_baselines
from invarbench.leaderboard.entries import ENTRIES_DIR, curve_median_norm, load_entries
from invarbench.leaderboard.plots import build_plots
from invarbench.leaderboard.reference import describe, load_reference
from invarbench.oracles import list_oracles
from invarbench.oracles.calibration import calibration_summary, format_rate
from invarbench.results import WORST_CASE, entry_results, invariance_frame, robustness_frame
from invarbench.tracks import INVARIANCE, PERTURBATION


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _headline(dataset: str) -> list[tuple[str, str]]:
    return [(norm, f"{eps:g}") for norm, eps in headline_pairs(dataset)]


NORM_ORDER = ("linf", "l2")


def _settings(robustness: pd.DataFrame) -> list[tuple[str, str]]:
    """Every stored (norm, eps): l_inf before l_2 (other norms after), by eps."""
    found = set(zip(robustness["norm"], robustness["setting"]))
    return sorted(
        found,
        key=lambda pair: (
            NORM_ORDER.index(pair[0]) if pair[0] in NORM_ORDER else len(NORM_ORDER),
            pair[0],
            float(pair[1]),
        ),
    )


def _lookup(frame: pd.DataFrame, keys: list[str], column: str) -> dict[tuple, Any]:
    """``column`` by the values of ``keys``, with missing values as None (for "-" in the tables)."""
    if frame.empty:
        return {}
    return {
        key: None if pd.isna(value) else value
        for key, value in zip(zip(*(frame[name] for name in keys)), frame[column])
    }


def _attack_columns(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(summary key, shown name) of each attack of an entry in cascade order; the shown name leaves
    out the runner's own options (eps=, cascade=), which say where an attack ran, not what it is."""
    columns = []
    for attack in entry["settings"]["attacks"]:
        options = tuple(attack.get("options", {}).items())
        shown = AttackSpec(
            attack["name"], tuple((key, value) for key, value in options if key not in RUNNER_OPTIONS)
        ).label()
        columns.append((AttackSpec(attack["name"], options).label(), shown))
    return columns


def perturbation_table(entries: list[dict[str, Any]], dataset: str, *, summary: bool = False) -> pd.DataFrame:
    """One row per model: clean accuracy, robust accuracy after each attack (cumulative, in cascade
    order) and the worst case at every stored threat (eps), ranked by worst case at the headline threat.
    ``summary`` keeps only the worst case per threat (named "NORM EPS"), for the README. The full
    table also gives, per norm, the median over all points of the minimum-norm attack's smallest
    adversarial norm (where the entry stores its curve)."""
    selected = [entry for entry in entries if entry["dataset"] == dataset and entry["track"] == PERTURBATION.name]
    invariance = {
        entry["model"]: entry for entry in entries if entry["dataset"] == dataset and entry["track"] == INVARIANCE.name
    }
    headline = _headline(dataset)
    robustness = robustness_frame(entry_results(selected))
    robust = _lookup(robustness, ["model", "norm", "setting", "attack"], "robust_accuracy")
    settings = _settings(robustness)
    linf_invariance = invariance_frame(entry_results(invariance.values()))
    linf_invariance = linf_invariance[linf_invariance["attack"] == "invariance-linf"]
    shown_attacks: list[str] = []
    for entry in selected:
        shown_attacks += [shown for _, shown in _attack_columns(entry) if shown not in shown_attacks]
    columns = ["model", "architecture", "recipe", "trained against", "n", "clean"]
    for norm, eps in settings:
        columns += (
            [f"{norm} {eps}"]
            if summary
            else [*(f"{norm} {eps} after {shown}" for shown in shown_attacks), f"{norm} {eps} worst case"]
        )
    curve_norms = (
        []
        if summary
        else [norm for norm in NORM_ORDER if any(norm in entry["results"].get("curves", {}) for entry in selected)]
    )
    columns += [f"{norm} median min. norm" for norm in curve_norms]
    invariance_settings = sorted(set(linf_invariance["setting"]))
    columns += [f"invariance accuracy {setting}" for setting in invariance_settings] + ["flags"]
    invariance_accuracy = _lookup(linf_invariance, ["model", "setting"], "invariance_accuracy")
    rows = []
    for entry in selected:
        results = entry["results"]
        row: dict[str, Any] = {
            "model": entry["model"],
            "architecture": entry["model_card"]["architecture"],
            "recipe": entry["model_card"]["recipe"],
            "trained against": entry["model_card"]["trained_against"],
            "n": entry["settings"]["n"],
            "clean": results["clean_accuracy"],
        }
        for norm, eps in settings:
            worst = robust.get((entry["model"], norm, eps, WORST_CASE))
            if summary:
                row[f"{norm} {eps}"] = worst
                continue
            for key, shown in _attack_columns(entry):
                if (entry["model"], norm, eps, key) in robust:
                    row[f"{norm} {eps} after {shown}"] = robust[entry["model"], norm, eps, key]
            row[f"{norm} {eps} worst case"] = worst
        for norm in curve_norms:
            curve = results.get("curves", {}).get(norm)
            row[f"{norm} median min. norm"] = curve_median_norm(curve) if curve else None
        for setting in invariance_settings:
            if (entry["model"], setting) in invariance_accuracy:
                row[f"invariance accuracy {setting}"] = invariance_accuracy[entry["model"], setting]
        row["flags"] = ", ".join(reliability_flags(entry)) or "none"
        rows.append(row)
    frame = pd.DataFrame(rows, columns=columns)
    if frame.empty:
        return frame
    # Columns no entry has a value for (an attack that ran only at other eps) are left out.
    frame = frame[[column for column in columns if frame[column].notna().any()]]
    suffix = "" if summary else " worst case"
    rank_by = next((f"{norm} {eps}{suffix}" for norm, eps in headline if f"{norm} {eps}{suffix}" in frame), None)
    frame = frame.sort_values(
        [rank_by, "model"] if rank_by else ["model"],
        ascending=[False, True] if rank_by else [True],
        na_position="last",
        kind="stable",
    ).reset_index(drop=True)
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame


def reliability_flags(entry: dict[str, Any]) -> list[str]:
    """Short names of what makes an entry's figures less reliable: the model checks that were raised and
    each attack's own warnings (AutoAttack's checks, e.g. Square beating the gradient attacks)."""
    results = entry["results"]
    flags = [check for check, raised in results.get("checks", {}).items() if raised]
    for attack, messages in sorted(results.get("attack_warnings", {}).items()):
        flags += [f"{attack}: {flag}" for flag in dict.fromkeys(reliability_flag(message) for message in messages)]
    if "attack_warnings" not in results and any(
        attack["name"] == "autoattack" for attack in entry["settings"]["attacks"]
    ):
        flags.append("autoattack warnings not recorded")
    return flags


def reliability_notes(entry: dict[str, Any]) -> list[str]:
    """The full text behind :func:`reliability_flags`, for a model page."""
    results = entry["results"]
    notes = list(results.get("warnings", []))
    notes += [
        f"{attack} {message}"
        for attack, messages in sorted(results.get("attack_warnings", {}).items())
        for message in messages
    ]
    if "attack_warnings" not in results and any(
        attack["name"] == "autoattack" for attack in entry["settings"]["attacks"]
    ):
        notes.append(
            "AutoAttack's own warnings were not recorded: the entry was stored before invarbench kept them; re-evaluate"
            " it to see them"
        )
    return notes


def oracle_table(entries: list[dict[str, Any]], dataset: str) -> pd.DataFrame:
    """Every named oracle of a data set and every oracle that judged one of its stored invariance
    figures, with its calibration against people's labels per labelled set (counts, rates and 95%
    intervals); an entry's own record of its oracle wins over the oracle's file."""
    reports: dict[str, dict[str, Any]] = {
        name: {"name": name, "calibration": list(definition.calibration)}
        for name, definition in list_oracles().items()
        if definition.dataset == dataset
    }
    for entry in entries:
        if entry["dataset"] == dataset and entry["track"] == INVARIANCE.name:
            reports.update(entry["results"].get("oracles", {}))
    rows = []
    for name, report in sorted(reports.items()):
        calibration = report.get("calibration") or []
        if report.get("exact") or not calibration:
            rows.append({"oracle": name, "labelled set": calibration_summary(report)})
        for item in calibration:
            rows.append(
                {
                    "oracle": name,
                    "labelled set": item["labels"],
                    "items": str(item["items"]),
                    "abstains": format_rate(item["abstained"], item["items"]),
                    "agrees with people": format_rate(item["agreed"], item["items"] - item["abstained"]),
                    "sees change people saw": format_rate(item["saw_change"], item["changed"]),
                    "calls change people did not see": format_rate(item["called_change"], item["unchanged"]),
                }
            )
    return pd.DataFrame(rows)


def _invariance_entries(entries: list[dict[str, Any]], dataset: str) -> tuple[dict[str, dict[str, Any]], pd.DataFrame]:
    """A data set's invariance entries by model, and their figures (:func:`invariance_frame`)."""
    selected = {
        entry["model"]: entry for entry in entries if entry["dataset"] == dataset and entry["track"] == INVARIANCE.name
    }
    return selected, invariance_frame(entry_results(selected.values()))


def _metric(value: Any) -> Any:
    return None if not isinstance(value, list | tuple) and pd.isna(value) else value


def invariance_table(entries: list[dict[str, Any]], dataset: str) -> pd.DataFrame:
    selected, frame = _invariance_entries(entries, dataset)
    rows = []
    for metrics in frame.to_dict("records"):
        entry = selected[metrics["model"]]
        rows.append(
            {
                "model": metrics["model"],
                "architecture": entry["model_card"]["architecture"],
                "recipe": entry["model_card"]["recipe"],
                "attack": metrics["attack"],
                "setting": metrics["setting"],
                "oracle": ",".join(metrics["oracle"]),
                "candidates": metrics["candidates"],
                "abstained": metrics["abstained"],
                "label changed": metrics["label_changed"],
                "invariance accuracy": _metric(metrics["invariance_accuracy"]),
                "invariance accuracy ci95": metrics["invariance_accuracy_ci95"],
                "excessive invariance": _metric(metrics["excessive_invariance_rate"]),
                "excessive invariance ci95": metrics["excessive_invariance_rate_ci95"],
                "oracle calibration": "; ".join(
                    calibration_summary(entry["results"].get("oracles", {}).get(name)) for name in metrics["oracle"]
                ),
            }
        )
    frame = pd.DataFrame(rows)
    return (
        frame.sort_values(["attack", "setting", "model"], kind="stable").reset_index(drop=True) if len(frame) else frame
    )


def invariance_summary_table(entries: list[dict[str, Any]], dataset: str) -> pd.DataFrame:
    """One row per model: invariance accuracy [95% interval] for every invariance attack and setting,
    with the number of candidates whose label the oracle says changed in each column's name where it is
    the same for every model (the searches that do not depend on the model), else per cell."""
    selected, frame = _invariance_entries(entries, dataset)
    figures = {(row["model"], row["attack"], row["setting"]): row for row in frame.to_dict("records")}
    settings = sorted(set(zip(frame["attack"], frame["setting"]))) if len(frame) else []
    names = {}
    for attack, setting in settings:
        found = frame[(frame["attack"] == attack) & (frame["setting"] == setting)]
        counts = set(zip(found["label_changed"], found["candidates"]))
        shared = f" ({counts.pop()[0]} of {found['candidates'].max()} changed)" if len(counts) == 1 else ""
        names[attack, setting] = f"{attack} {setting}{shared}"
    rows = []
    for model, entry in selected.items():
        row: dict[str, Any] = {"model": model, "n": entry["settings"]["n"]}
        for (attack, setting), column in names.items():
            metrics = figures.get((model, attack, setting))
            if metrics is None or _metric(metrics["invariance_accuracy"]) is None:
                row[column] = "-"
                continue
            low, high = metrics["invariance_accuracy_ci95"]
            changed = "" if column.endswith("changed)") else f" of {metrics['label_changed']}"
            row[column] = f"{_percent(metrics['invariance_accuracy'])} [{100 * low:.1f}, {100 * high:.1f}]{changed}"
        row["oracle"] = ", ".join(sorted(entry["results"].get("oracles", {})))
        rows.append(row)
    return pd.DataFrame(rows).sort_values("model", kind="stable").reset_index(drop=True) if rows else pd.DataFrame()


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    """Rates as percentages with their intervals folded in, for Markdown, LaTeX and HTML."""
    shown = frame.copy()
    for column in list(shown.columns):
        if column.endswith(" ci95"):
            base = column[: -len(" ci95")]
            shown[base] = [
                (
                    f"{_percent(value)} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
                    if value is not None and not pd.isna(value)
                    else "-"
                )
                for value, interval in zip(frame[base], frame[column])
            ]
            shown = shown.drop(columns=column)
        elif column.endswith("min. norm"):
            shown[column] = ["-" if value is None or pd.isna(value) else f"{value:.3g}" for value in shown[column]]
        elif (
            pd.api.types.is_float_dtype(shown[column])
            or column in ("clean",)
            or "worst case" in column
            or column.startswith("invariance accuracy")
            or column.partition(" ")[0] in NORM_ORDER
        ):
            shown[column] = [
                value if isinstance(value, str) else _percent(None if pd.isna(value) else value)
                for value in shown[column]
            ]
    return shown.fillna("-")


def markdown(frame: pd.DataFrame) -> str:
    shown = _display(frame)
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def latex(frame: pd.DataFrame) -> str:
    shown = _display(frame)

    def escape(value: object) -> str:
        return (
            str(value)
            .replace("\\", r"\textbackslash{}")
            .replace("&", r"\&")
            .replace("%", r"\%")
            .replace("_", r"\_")
            .replace("#", r"\#")
        )

    lines = [
        r"\begin{tabular}{" + "l" * len(shown.columns) + "}",
        r"\hline",
        " & ".join(escape(column) for column in shown.columns) + r" \\",
        r"\hline",
    ]
    lines += [" & ".join(escape(value) for value in row) + r" \\" for row in shown.itertuples(index=False)]
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def html_table(frame: pd.DataFrame, *, table_id: str, links: dict[str, str] | None = None) -> str:
    """An HTML table (sortable and filterable by the site's script); ``links`` turns the ``model`` cells
    into links (model name -> address)."""
    shown = _display(frame)
    links = links or {}
    head = "".join(
        f'<th data-column="{position}">{html.escape(str(column))}</th>' for position, column in enumerate(shown.columns)
    )

    def cell(column: str, value: object) -> str:
        text = html.escape(str(value))
        if column == "model" and value in links:
            text = f'<a href="{html.escape(links[str(value)])}">{text}</a>'
        return f"<td>{text}</td>"

    body = "".join(
        "<tr>" + "".join(cell(column, value) for column, value in zip(shown.columns, row)) + "</tr>\n"
        for row in shown.itertuples(index=False)
    )
    return (
        f'<table id="{table_id}"'
        f' class="leaderboard">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n'
    )


def with_references(
    frame: pd.DataFrame, entries: list[dict[str, Any]], entries_dir: str | Path, dataset: str
) -> pd.DataFrame:
    """The perturbation table with a ``reference`` column before ``flags`` (what a reference attack on the
    regression subset found that the entry's attacks missed, leaderboard/reference.py), where any entry has one."""
    shown = {
        entry["model"]: describe(load_reference(entries_dir, entry))
        for entry in entries
        if entry["dataset"] == dataset and entry["track"] == PERTURBATION.name
    }
    if frame.empty or all(text == "-" for text in shown.values()):
        return frame
    frame = frame.copy()
    frame.insert(list(frame.columns).index("flags"), "reference", frame["model"].map(shown).fillna("-"))
    return frame


@dataclass(frozen=True)
class Table:
    """A table a track's entries make: ``DATASET-NAME`` in the output folder, built by ``build(entries,
    dataset, entries_dir)``. A ``full`` table is written as Markdown, CSV, LaTeX and HTML and shown on the
    site's details page under ``title``; the others (compact summaries, comparisons) as Markdown only."""

    name: str
    build: Callable[[list[dict[str, Any]], str, Path], pd.DataFrame]
    title: str = ""
    full: bool = True


#: The tables of each track, by track name, in the order they are built (:func:`register_tables`).
TABLES: dict[str, list[Table]] = {}


def register_tables(track: str, *tables: Table) -> None:
    """Add ``tables`` to those built for ``track``'s entries (a new track registers its own)."""
    TABLES.setdefault(track, []).extend(tables)


def _write_table(frame: pd.DataFrame, stem: Path, table_id: str) -> list[Path]:
    """A full table as Markdown, CSV (intervals as ``low;high``), LaTeX and HTML."""
    csv = frame.copy()
    for column in [column for column in csv.columns if column.endswith(" ci95")]:
        csv[column] = [
            f"{interval[0]:.6f};{interval[1]:.6f}" if isinstance(interval, list | tuple) else ""
            for interval in csv[column]
        ]
    return [
        atomic_write_text(stem.with_suffix(".md"), markdown(frame)),
        atomic_write_text(stem.with_suffix(".csv"), csv.to_csv(index=False, float_format="%.6f", lineterminator="\n")),
        atomic_write_text(stem.with_suffix(".tex"), latex(frame)),
        atomic_write_text(stem.with_suffix(".html"), html_table(frame, table_id=table_id)),
    ]


def dataset_tables(
    entries: list[dict[str, Any]], dataset: str, entries_dir: str | Path
) -> Iterator[tuple[Table, pd.DataFrame]]:
    """Every registered table of ``dataset`` that has rows, with its frame."""
    for tables in TABLES.values():
        for table in tables:
            frame = table.build(entries, dataset, Path(entries_dir))
            if not frame.empty:
                yield table, frame


def build_tables(entries_dir: str | Path = ENTRIES_DIR, out_dir: str | Path = OUTPUT_DIR) -> list[Path]:
    """Write every registered table of every data set (:data:`TABLES`) and the plots; returns the files written."""
    entries = load_entries(entries_dir)
    out_dir = Path(out_dir)
    written = []
    for dataset in sorted({entry["dataset"] for entry in entries}):
        for table, frame in dataset_tables(entries, dataset, entries_dir):
            stem = out_dir / f"{dataset}-{table.name}"
            if table.full:
                written += _write_table(frame, stem, f"{dataset}-{table.name}")
            else:
                written.append(atomic_write_text(stem.with_suffix(".md"), markdown(frame)))
    written += build_plots(entries, out_dir)
    return written


register_tables(
    PERTURBATION.name,
    # The compact table (worst case per threat) the README shows; the full one has every attack.
    Table(
        "perturbation-summary",
        lambda entries, dataset, _: perturbation_table(entries, dataset, summary=True),
        full=False,
    ),
    Table(
        "perturbation",
        lambda entries, dataset, folder: with_references(
            perturbation_table(entries, dataset), entries, folder, dataset
        ),
        title="perturbation track, every attack",
    ),
    Table(
        "baseline-comparison",
        lambda entries, dataset, folder: comparison_frame(load_baselines(folder.parent / "baselines"), folder, dataset),
        full=False,
    ),
)
register_tables(
    INVARIANCE.name,
    Table("invariance-summary", lambda entries, dataset, _: invariance_summary_table(entries, dataset), full=False),
    Table(
        "invariance",
        lambda entries, dataset, _: invariance_table(entries, dataset),
        title="invariance track, every attack and setting",
    ),
    Table(
        "oracles",
        lambda entries, dataset, _: oracle_table(entries, dataset),
        title="oracles of the invariance track and their calibration against people's labels",
    ),
)


def sync_readme(readme: str | Path, out_dir: str | Path = OUTPUT_DIR, *, prefix: str = "leaderboard") -> list[str]:
    """Replace every block between ``<!-- PREFIX:NAME -->`` and ``<!-- /PREFIX:NAME -->`` in ``readme``
    with the built table ``out_dir/NAME.md`` (``leaderboard``: the leaderboard's tables; ``benchmarks``:
    the speed tables of benchmarks/report.py); returns the names replaced."""
    import re

    readme, out_dir = Path(readme), Path(out_dir)
    text = readme.read_text(encoding="utf-8")
    replaced = []

    def replace(match: re.Match) -> str:
        name = match.group(1)
        table = out_dir / f"{name}.md"
        if not table.exists():
            raise FileNotFoundError(
                f"{readme} asks for the table {name!r} but {table} was not built; build it first or remove the markers"
            )
        replaced.append(name)
        return f"<!-- {prefix}:{name} -->\n{table.read_text(encoding='utf-8')}<!-- /{prefix}:{name} -->"

    updated = re.sub(rf"<!-- {prefix}:([A-Za-z0-9_.-]+) -->\n.*?<!-- /{prefix}:\1 -->", replace, text, flags=re.DOTALL)
    if updated != text:
        atomic_write_text(readme, updated)
    return replaced
