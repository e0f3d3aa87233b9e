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
    assert sorted(path.suffix for path in (site / "site").rglob("*") if path.is_file()) == [".html"] * 3
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
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto((site / "site" / "index.html").as_uri())
        table = page.locator("#spheres-perturbation")
        models = table.locator("tbody tr td:nth-child(2)").all_inner_texts()
        assert sorted(models) == sorted(entry["model"] for entry in entries if entry["track"] == "perturbation")
        invariance_rows = page.locator("#spheres-invariance tbody tr").count()
        assert invariance_rows == sum(
            len(settings)
            for entry in entries
            if entry["track"] == "invariance"
            for settings in entry["results"]["invariance"].values()
        )
        # Sorting by model name reorders the rows (they start ranked by worst-case robust accuracy).
        before = table.locator("tbody tr td:nth-child(2)").all_inner_texts()
        table.locator("th", has_text="model").first.click()
        ascending = table.locator("tbody tr td:nth-child(2)").all_inner_texts()
        table.locator("th", has_text="model").first.click()
        descending = table.locator("tbody tr td:nth-child(2)").all_inner_texts()
        assert ascending == sorted(before) and descending == sorted(before, reverse=True) and ascending != descending
        page.locator('input.filter[data-table="spheres-perturbation"]').fill("pgd-linf")
        assert table.locator("tbody tr:visible").count() == 1
        images = page.locator("img")
        assert images.count() > 0
        for position in range(images.count()):
            assert images.nth(position).evaluate("image => image.complete && image.naturalWidth > 0"), images.nth(
                position
            ).get_attribute("src")
        page.screenshot(path=str(tmp_path / "leaderboard.png"), full_page=True)
        assert (tmp_path / "leaderboard.png").stat().st_size > 10_000
        model_page = browser.new_page()
        model_page.goto((site / "site" / "models" / "spheres-mlp-pgd-linf.html").as_uri())
        assert "Model card" in model_page.content()
        # Beside the invariance figures: which oracle judged them and how far it can be trusted.
        assert "judged by the oracle exact:spheres: exact" in model_page.locator("p.oracle").inner_text()
        assert page.locator("#spheres-oracles tbody tr").count() == 1
        for position in range(model_page.locator("img").count()):
            assert model_page.locator("img").nth(position).evaluate("image => image.complete && image.naturalWidth > 0")
        browser.close()
