"""The static leaderboard site: an index with sortable, filterable tables and one page per model with
its card, plots and galleries. Everything is local and nothing is copied: pages link the plots where
``leaderboard build`` writes them (the output folder), the galleries where entries keep them and the
style sheet and script in the package's templates, by relative paths (serve or copy the leaderboard
folder as a whole). The same entries always give the same bytes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jinja2

from invarbench.io import atomic_write_text
from invarbench.leaderboard import OUTPUT_DIR, SITE_DIR
from invarbench.leaderboard.entries import ENTRIES_DIR, load_entries
from invarbench.leaderboard.plots import build_plots
from invarbench.leaderboard.tables import (
    html_table,
    invariance_table,
    oracle_table,
    perturbation_table,
    reliability_notes,
)
from invarbench.models import get_card, list_models
from invarbench.oracles.calibration import calibration_summary

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


def build_site(
    entries_dir: str | Path = ENTRIES_DIR, site_dir: str | Path = SITE_DIR, output_dir: str | Path = OUTPUT_DIR
) -> list[Path]:
    """Write the index and model pages into ``site_dir``, linking the plots of ``output_dir`` (built
    there if missing) and the galleries of ``entries_dir``."""
    entries_dir, site_dir, output_dir = Path(entries_dir), Path(site_dir), Path(output_dir)
    entries = load_entries(entries_dir)
    # Sites built before pages linked their images kept copies in assets/.
    if (site_dir / "assets").exists():
        shutil.rmtree(site_dir / "assets")
    datasets = sorted({entry["dataset"] for entry in entries})
    plot_files = sorted(path for dataset in datasets for path in output_dir.glob(f"{dataset}-*.png"))
    if not plot_files:
        plot_files = [path for path in build_plots(entries, output_dir) if path.suffix == ".png"]
    written: list[Path] = []
    galleries: dict[str, list[Path]] = {}
    for gallery in sorted(entries_dir.glob("*.gallery.png")):
        galleries.setdefault(gallery.name.split("__")[0], []).append(gallery)
    tables = []
    for dataset in sorted({entry["dataset"] for entry in entries}):
        for track, title, frame in (
            ("perturbation", "perturbation track", perturbation_table(entries, dataset)),
            ("invariance", "invariance track", invariance_table(entries, dataset)),
            (
                "oracles",
                "oracles of the invariance track and their calibration against people's labels",
                oracle_table(entries, dataset),
            ),
        ):
            if len(frame):
                table_id = f"{dataset}-{track}"
                tables.append(
                    {
                        "id": table_id,
                        "title": f"{dataset}: {title}",
                        "html": jinja2.utils.markupsafe.Markup(html_table(frame, table_id=table_id)),
                    }
                )
    models = sorted({entry["model"] for entry in entries})
    index = TEMPLATES.get_template("index.html.j2").render(
        title="invarbench leaderboard",
        links=_links(site_dir),
        tables=tables,
        plots=[_link(path, site_dir) for path in plot_files],
        models=models,
        entry_count=len(entries),
    )
    written.append(atomic_write_text(site_dir / "index.html", index))
    registered = set(list_models(role=None))
    pages = site_dir / "models"
    for model in models:
        model_entries = [entry for entry in entries if entry["model"] == model]
        model_datasets = {entry["dataset"] for entry in model_entries}
        images = [_link(path, pages) for path in plot_files if path.name.split("-")[0] in model_datasets] + [
            _link(path, pages) for path in galleries.get(model, [])
        ]
        reference = model_entries[0]["reference"]
        card = get_card(reference).to_toml() if reference in registered else None
        page = TEMPLATES.get_template("model.html.j2").render(
            title=f"{model} - invarbench",
            links=_links(pages),
            model=model,
            entries=model_entries,
            images=images,
            card=card,
            calibration_summary=calibration_summary,
            reliability_notes=reliability_notes,
        )
        written.append(atomic_write_text(pages / f"{model}.html", page))
    return written
