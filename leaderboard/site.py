"""The static leaderboard site: an index with sortable, filterable tables and one page per model with
its card, plots and galleries. Everything is local (inline CSS and JavaScript, images copied in), and
the same entries always give the same bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import jinja2
from invarbench.io import atomic_write_bytes, atomic_write_text
from invarbench.leaderboard import SITE_DIR
from invarbench.leaderboard.entries import ENTRIES_DIR, load_entries
from invarbench.leaderboard.plots import build_plots
from invarbench.leaderboard.tables import calibration_summary, html_table, invariance_table, oracle_table, perturbation_table, reliability_notes

TEMPLATES_DIR = Path(__file__).parent / "templates"
TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=jinja2.select_autoescape(["html", "j2"]), keep_trailing_newline=True)


def build_site(entries_dir: str | Path = ENTRIES_DIR, site_dir: str | Path = SITE_DIR) -> list[Path]:
    from invarbench.models import get_card, list_models

    entries_dir, site_dir = Path(entries_dir), Path(site_dir)
    entries = load_entries(entries_dir)
    assets = site_dir / "assets"
    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    written = build_plots(entries, assets)
    for name in ("site.css", "site.js"):
        written.append(atomic_write_bytes(assets / name, (TEMPLATES_DIR / name).read_bytes()))
    galleries = {}
    for gallery in sorted(entries_dir.glob("*.gallery.png")):
        target = assets / gallery.name
        written.append(atomic_write_bytes(target, gallery.read_bytes()))
        galleries.setdefault(gallery.name.split("__")[0], []).append(f"assets/{gallery.name}")
    tables = []
    for dataset in sorted({entry["dataset"] for entry in entries}):
        for track, title, frame in (("perturbation", "perturbation track", perturbation_table(entries, dataset)), ("invariance", "invariance track", invariance_table(entries, dataset)), ("oracles", "oracles of the invariance track and their calibration against people's labels", oracle_table(entries, dataset))):
            if len(frame):
                table_id = f"{dataset}-{track}"
                tables.append({"id": table_id, "title": f"{dataset}: {title}", "html": jinja2.utils.markupsafe.Markup(html_table(frame, table_id=table_id))})
    plots = [f"assets/{path.name}" for path in written if path.suffix == ".png" and not path.name.endswith(".gallery.png")]
    models = sorted({entry["model"] for entry in entries})
    index = TEMPLATES.get_template("index.html.j2").render(title="invarbench leaderboard", root="", tables=tables, plots=plots, models=models, entry_count=len(entries))
    written.append(atomic_write_text(site_dir / "index.html", index))
    registered = set(list_models(role=None))
    for model in models:
        model_entries = [entry for entry in entries if entry["model"] == model]
        datasets = {entry["dataset"] for entry in model_entries}
        images = [plot for plot in plots if plot.split("/")[-1].split("-")[0] in datasets] + galleries.get(model, [])
        reference = model_entries[0]["reference"]
        card = get_card(reference).to_toml() if reference in registered else None
        page = TEMPLATES.get_template("model.html.j2").render(title=f"{model} - invarbench", root="../", model=model, entries=model_entries, images=images, card=card, calibration_summary=calibration_summary, reliability_notes=reliability_notes)
        written.append(atomic_write_text(site_dir / "models" / f"{model}.html", page))
    return written
