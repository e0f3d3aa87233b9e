"""The static leaderboard site: an index that leads with each data set's headline table (clean
accuracy, worst case per eps, invariance accuracy, flags), the sensitivity-invariance trade-off and the
robustness curves, and the invariance summary with its oracle's calibration said once; a details page
with every table in full (each attack and setting); one page per model with its row, its robustness
curves drawn over the others', the trade-off, its galleries and its card. Tables sort and filter.
Everything is local and nothing is copied: pages link the plots where ``leaderboard build`` writes them
(the output folder), the galleries where entries keep them and the style sheet and script in the
package's templates, by relative paths (serve or copy the leaderboard folder as a whole). The same
entries always give the same bytes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jinja2
import pandas as pd

from invarbench.io import atomic_write_text
from invarbench.leaderboard import OUTPUT_DIR, SITE_DIR
from invarbench.leaderboard.entries import ENTRIES_DIR, load_entries
from invarbench.leaderboard.plots import build_plots
from invarbench.leaderboard.tables import (
    dataset_tables,
    html_table,
    invariance_summary_table,
    perturbation_table,
    reliability_notes,
)
from invarbench.models import get_card, list_models
from invarbench.oracles.calibration import calibration_summary
from invarbench.tracks import INVARIANCE

Markup = jinja2.utils.markupsafe.Markup
TEMPLATES_DIR = Path(__file__).parent / "templates"
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    keep_trailing_newline=True,
)


def _link(path: Path, page_dir: Path) -> str:
    """``path`` relative to a page in ``page_dir``, with forward slashes."""
    return os.path.relpath(path.resolve(), page_dir.resolve()).replace(os.sep, "/")


def _links(page_dir: Path) -> dict[str, str]:
    """The style sheet and script, from a page in ``page_dir``."""
    return {"style": _link(TEMPLATES_DIR / "site.css", page_dir), "script": _link(TEMPLATES_DIR / "site.js", page_dir)}


#: Columns of the headline table that the model pages and the details page show instead.
DETAIL_COLUMNS = ("architecture", "recipe", "trained against", "n")


def _dataset_sections(
    entries: list[dict], headlines: dict[str, pd.DataFrame], plot_files: list[Path], site_dir: Path
) -> list[dict]:
    """Per data set, what the index leads with: the headline table (clean accuracy, worst case per eps,
    invariance accuracy, flags), the trade-off and robustness plots, and the invariance summary with its
    oracle's calibration said once."""
    sections = []
    for dataset in sorted({entry["dataset"] for entry in entries}):
        models = sorted({entry["model"] for entry in entries if entry["dataset"] == dataset})
        links = {model: f"models/{model}.html" for model in models}
        headline = headlines[dataset]
        sizes = sorted(set(headline["n"])) if "n" in headline else []
        headline = headline.drop(columns=[column for column in DETAIL_COLUMNS if column in headline])
        headline = headline.rename(columns=lambda column: column.replace("invariance accuracy ", "invariance "))
        invariance = invariance_summary_table(entries, dataset)
        oracles: dict[str, dict] = {}
        for entry in entries:
            if entry["dataset"] == dataset and entry["track"] == INVARIANCE.name:
                oracles.update(entry["results"].get("oracles", {}))
        invariance_sizes = sorted(set(invariance["n"])) if "n" in invariance else []
        invariance = invariance.drop(columns=[column for column in ("n", "oracle") if column in invariance])
        plots = [path for path in plot_files if path.name.startswith(f"{dataset}-")]
        # The trade-off first: the picture only this benchmark draws.
        plots.sort(key=lambda path: ("-tradeoff-" not in path.name, path.name))
        sections.append(
            {
                "dataset": dataset,
                "headline": Markup(html_table(headline, table_id=f"{dataset}-headline", links=links))
                if len(headline)
                else None,
                "sizes": "/".join(map(str, sizes)),
                "plots": [_link(path, site_dir) for path in plots],
                "invariance": Markup(html_table(invariance, table_id=f"{dataset}-invariance-summary", links=links))
                if len(invariance)
                else None,
                "invariance_sizes": "/".join(map(str, invariance_sizes)),
                "oracles": [(name, calibration_summary(report)) for name, report in sorted(oracles.items())],
            }
        )
    return sections


def _detail_tables(entries: list[dict], entries_dir: Path) -> list[dict]:
    """Every full table of every track (each attack, setting and oracle), for the details page."""
    tables = []
    links = {entry["model"]: f"models/{entry['model']}.html" for entry in entries}
    for dataset in sorted({entry["dataset"] for entry in entries}):
        for table, frame in dataset_tables(entries, dataset, entries_dir):
            if table.full:
                table_id = f"{dataset}-{table.name}"
                tables.append(
                    {
                        "id": table_id,
                        "title": f"{dataset}: {table.title or table.name}",
                        "html": Markup(html_table(frame, table_id=table_id, links=links)),
                    }
                )
    return tables


def build_site(
    entries_dir: str | Path = ENTRIES_DIR, site_dir: str | Path = SITE_DIR, output_dir: str | Path = OUTPUT_DIR
) -> list[Path]:
    """Write the index, the details page and the model pages into ``site_dir``, linking the plots of
    ``output_dir`` (built there if missing) and the galleries of ``entries_dir``."""
    entries_dir, site_dir, output_dir = Path(entries_dir), Path(site_dir), Path(output_dir)
    entries = load_entries(entries_dir)
    # Sites built before pages linked their images kept copies in assets/.
    if (site_dir / "assets").exists():
        shutil.rmtree(site_dir / "assets")
    datasets = sorted({entry["dataset"] for entry in entries})
    plot_files = sorted(path for dataset in datasets for path in output_dir.glob(f"{dataset}-*.svg"))
    if not plot_files or not (output_dir / "models").is_dir():
        plot_files = [path for path in build_plots(entries, output_dir) if path.suffix == ".svg"]
        plot_files = sorted(path for path in plot_files if path.parent == output_dir)
    written: list[Path] = []
    galleries: dict[str, list[Path]] = {}
    for gallery in sorted(entries_dir.glob("*.gallery.png")):
        galleries.setdefault(gallery.name.split("__")[0], []).append(gallery)
    models = sorted({entry["model"] for entry in entries})
    # The headline table of each data set, for the index and each model page's row.
    headlines = {dataset: perturbation_table(entries, dataset, summary=True) for dataset in datasets}
    index = TEMPLATES.get_template("index.html.j2").render(
        title="invarbench leaderboard",
        links=_links(site_dir),
        sections=_dataset_sections(entries, headlines, plot_files, site_dir),
        models=models,
        entry_count=len(entries),
    )
    written.append(atomic_write_text(site_dir / "index.html", index))
    details = TEMPLATES.get_template("details.html.j2").render(
        title="invarbench leaderboard: every attack",
        links=_links(site_dir),
        tables=_detail_tables(entries, entries_dir),
    )
    written.append(atomic_write_text(site_dir / "details.html", details))
    registered = set(list_models(role=None))
    pages = site_dir / "models"
    for model in models:
        model_entries = [entry for entry in entries if entry["model"] == model]
        model_datasets = {entry["dataset"] for entry in model_entries}
        own_curves = sorted((output_dir / "models").glob(f"{model}-robustness.svg"))
        shared = [
            path
            for path in plot_files
            if path.name.split("-")[0] in model_datasets and (not own_curves or "-robustness-" not in path.name)
        ]
        curves = [_link(path, pages) for path in own_curves]
        images = [_link(path, pages) for path in shared] + [_link(path, pages) for path in galleries.get(model, [])]
        rows = [
            (
                dataset,
                Markup(
                    html_table(
                        frame[frame["model"] == model].drop(columns=["rank"]),
                        table_id=f"{dataset}-{model}",
                    )
                ),
            )
            for dataset in sorted(model_datasets)
            for frame in [headlines[dataset]]
            if "model" in frame and (frame["model"] == model).any()
        ]
        reference = model_entries[0]["reference"]
        card = get_card(reference).to_toml() if reference in registered else None
        page = TEMPLATES.get_template("model.html.j2").render(
            title=f"{model} - invarbench",
            links=_links(pages),
            model=model,
            rows=rows,
            curves=curves,
            entries=model_entries,
            images=images,
            card=card,
            calibration_summary=calibration_summary,
            reliability_notes=reliability_notes,
        )
        written.append(atomic_write_text(pages / f"{model}.html", page))
    return written
