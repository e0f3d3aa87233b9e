"""The static leaderboard page in a real browser: Debian's chromium through Playwright (never a
browser Playwright downloads itself)."""

import shutil
from pathlib import Path

import pytest

from invarbench.attacks import ThreatModel
from invarbench.config import AttackSpec, ModelSpec, RunConfig
from invarbench.leaderboard.entries import add_run, load_entries
from invarbench.leaderboard.site import build_site
from invarbench.leaderboard.tables import build_tables
from invarbench.runner import run_benchmark

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    config = RunConfig(
        (ModelSpec("spheres-mlp-standard", "spheres"), ModelSpec("spheres-mlp-pgd-linf", "spheres")),
        (ThreatModel("linf", (0.02, 0.025)),),
        (AttackSpec("fgsm"), AttackSpec("invariance-linf")),
        n=40,
        shard_size=20,
    )
    run_benchmark(config, root / "runs", name="run", progress=False)
    add_run(root / "runs" / "run", root / "entries")
    build_tables(root / "entries", root / "output")
    build_site(root / "entries", root / "site", root / "output")
    return root


def test_site_is_local_links_instead_of_copying_and_rebuilds_byte_identically(site):
    index = (site / "site" / "index.html").read_text()
    assert "http://" not in index and "https://" not in index, "no external network resources"
    assert (site / "site" / "models" / "spheres-mlp-pgd-linf.html").exists()
    # Only pages: plots stay in the output folder, galleries with the entries, style and script in the templates.
    assert sorted(path.suffix for path in (site / "site").rglob("*") if path.is_file()) == [".html"] * 4
    import re

    assert 'src="../output/spheres-' in index
    for link in re.findall(r'(?:src|href)="([^"#]+\.(?:png|css|js))"', index):
        assert (site / "site" / link).resolve().is_file(), link
    before = {path: path.read_bytes() for path in (site / "site").rglob("*") if path.is_file()}
    build_site(site / "entries", site / "site", site / "output")
    assert {path: path.read_bytes() for path in (site / "site").rglob("*") if path.is_file()} == before


@pytest.mark.browser
@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make test installs it with apt-get)"
)
def test_page_in_headless_chromium_shows_every_entry_sorts_and_loads_images(site, tmp_path):
    from playwright.sync_api import sync_playwright

    entries = load_entries(site / "entries")
    perturbation = sorted(entry["model"] for entry in entries if entry["track"] == "perturbation")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((site / "site" / "index.html").as_uri())
        # The index leads with the headline table: model, clean, worst case per eps, invariance, flags.
        table = page.locator("#spheres-headline")
        headers = table.locator("th").all_inner_texts()
        assert headers[:3] == ["rank", "model", "clean"] and headers[-1] == "flags"
        assert "architecture" not in headers and not any(" after " in header for header in headers)
        models = table.locator("tbody tr td:nth-child(2)").all_inner_texts()
        assert sorted(models) == perturbation
        # Sorting by model name reorders the rows (they start ranked by worst-case robust accuracy).
        before = table.locator("tbody tr td:nth-child(2)").all_inner_texts()
        table.locator("th", has_text="model").first.click()
        ascending = table.locator("tbody tr td:nth-child(2)").all_inner_texts()
        table.locator("th", has_text="model").first.click()
        descending = table.locator("tbody tr td:nth-child(2)").all_inner_texts()
        assert ascending == sorted(before) and descending == sorted(before, reverse=True) and ascending != descending
        page.locator('input.filter[data-table="spheres-headline"]').fill("pgd-linf")
        assert table.locator("tbody tr:visible").count() == 1
        # The oracle's calibration is said once, in the invariance summary's caption, not on every row.
        assert page.content().count("exact (labelling function") == 1
        assert "oracle" not in page.locator("#spheres-invariance-summary th").all_inner_texts()
        # It reads without horizontal scrolling at 1280 px, with the trade-off and robustness plots.
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        sources = page.locator("img").evaluate_all("images => images.map(image => image.getAttribute('src'))")
        assert any("tradeoff" in source for source in sources) and any("robustness" in source for source in sources)
        _assert_images_load(page)
        page.screenshot(path=str(tmp_path / "leaderboard.png"), full_page=True)
        assert (tmp_path / "leaderboard.png").stat().st_size > 10_000
        # Each model links its page; every attack's figure is on the details page.
        table.locator("a", has_text="spheres-mlp-pgd-linf").click()
        assert page.url.endswith("models/spheres-mlp-pgd-linf.html")
        details = browser.new_page()
        details.goto((site / "site" / "details.html").as_uri())
        assert details.locator("#spheres-perturbation tbody tr").count() == len(perturbation)
        assert any(" after " in header for header in details.locator("#spheres-perturbation th").all_inner_texts())
        invariance_rows = details.locator("#spheres-invariance tbody tr").count()
        assert invariance_rows == sum(
            len(settings)
            for entry in entries
            if entry["track"] == "invariance"
            for settings in entry["results"]["invariance"].values()
        )
        assert details.locator("#spheres-oracles tbody tr").count() == 1
        model_page = browser.new_page(viewport={"width": 1280, "height": 900})
        model_page.goto((site / "site" / "models" / "spheres-mlp-pgd-linf.html").as_uri())
        assert "Model card" in model_page.content()
        # Its own robustness curve, drawn over the others', comes first.
        first = model_page.locator("img").first.get_attribute("src")
        assert first.endswith("output/models/spheres-mlp-pgd-linf-robustness.svg")
        # Beside the invariance figures: which oracle judged them and how far it can be trusted.
        assert "judged by the oracle exact:spheres: exact" in model_page.locator("p.oracle").inner_text()
        assert model_page.evaluate("document.documentElement.scrollWidth") <= 1280
        _assert_images_load(model_page)
        browser.close()


def _assert_images_load(page) -> None:
    images = page.locator("img")
    assert images.count() > 0
    for position in range(images.count()):
        assert images.nth(position).evaluate("image => image.complete && image.naturalWidth > 0"), images.nth(
            position
        ).get_attribute("src")
