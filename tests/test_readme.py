import re
from pathlib import Path

from invarbench.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
BLOCK = re.compile(r"<!-- leaderboard:([A-Za-z0-9_.-]+) -->\n(.*?)<!-- /leaderboard:\1 -->", flags=re.DOTALL)
# Markdown links and images, [text](target), and HTML href/src attributes.
LINK = re.compile(r"\]\(([^)\s]+)\)|(?:href|src)=\"([^\"]+)\"")
FENCE = re.compile(r"^```.*?^```", flags=re.DOTALL | re.MULTILINE)


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    return [first or second for first, second in LINK.findall(text)]


def test_docs_show_the_zoo_table_of_the_cards(capsys):
    assert main(["models", "list", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    assert table in (ROOT / "docs" / "models.md").read_text(), (
        "docs/models.md's zoo table is stale: paste `invarbench models list --markdown` after the zoo-table marker"
    )


def test_readme_names_the_set_up_commands():
    text = README.read_text()
    assert "make bench" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_front_page_under_12k_characters():
    size = len(README.read_text())
    assert size < 12_000, f"README.md has {size} characters; move detail into docs/ and link it"


def test_every_link_in_readme_and_docs_stays_inside_the_repository():
    assert DOCS, "docs/*.md pages exist"
    for page in PAGES:
        for target in links(page):
            assert not re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE), (
                f"{page.relative_to(ROOT)} links outside the repository: {target}"
            )
            assert not target.startswith("/"), f"{page.relative_to(ROOT)} links to an absolute path: {target}"
            path = target.split("#", 1)[0]
            if not path:
                continue
            resolved = (page.parent / path).resolve()
            assert resolved.is_relative_to(ROOT), f"{page.relative_to(ROOT)} links outside the repository: {target}"
            assert "shared" not in resolved.relative_to(ROOT).parts, (
                f"{page.relative_to(ROOT)} links into shared/: {target}"
            )
            assert resolved.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
        text = page.read_text()
        assert "/work/" not in text and "../shared" not in text, (
            f"{page.relative_to(ROOT)} names a path outside the repository"
        )


def test_readme_and_docs_results_tables_are_built_from_the_stored_entries(tmp_path):
    from invarbench.leaderboard.entries import ENTRIES_DIR
    from invarbench.leaderboard.tables import OUTPUT_DIR, build_tables

    output = tmp_path / "output"
    build_tables(ENTRIES_DIR, output)
    for built in [path for path in output.glob("*") if path.suffix in (".md", ".csv", ".tex", ".html")]:
        assert built.read_bytes() == (OUTPUT_DIR / built.name).read_bytes(), (
            f"leaderboard/output/{built.name} is stale: run `make leaderboard` or `invarbench leaderboard build` with"
            " --readme for README.md and docs/*.md"
        )
    assert BLOCK.findall(README.read_text()), "README shows the generated leaderboard tables"
    for page in PAGES:
        for name, block in BLOCK.findall(page.read_text()):
            assert block == (output / f"{name}.md").read_text(), (
                f"{page.relative_to(ROOT)}'s {name} table is stale: run `invarbench leaderboard build --readme"
                f" {page.relative_to(ROOT)}`"
            )


def test_speed_tables_are_generated_from_the_benchmark_outputs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    tables = report.render()
    for page in ("speed.md", "models.md", "labelling.md"):
        blocks = dict(
            re.findall(
                r"<!-- benchmarks:([A-Za-z0-9_.-]+) -->\n(.*?)<!-- /benchmarks:\1 -->",
                (ROOT / "docs" / page).read_text(),
                flags=re.DOTALL,
            )
        )
        assert blocks, f"docs/{page} has generated benchmark tables"
        for name, text in blocks.items():
            assert text == tables[name], f"docs/{page}'s {name} table is stale: run `python benchmarks/report.py`"
