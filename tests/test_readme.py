from pathlib import Path

from invarbench.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_zoo_table_matches_the_cards(capsys):
    assert main(["models", "list", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    assert table in README.read_text(), "README's zoo table is stale: paste `invarbench models list --markdown` between the zoo-table markers"


def test_readme_names_the_set_up_commands():
    text = README.read_text()
    assert "make bench" in text and "make test" in text
    assert "make test" in (README.parent / ".ci" / "run").read_text()


def test_readme_leaderboard_tables_are_built_from_the_stored_entries(tmp_path):
    import re

    from invarbench.leaderboard.entries import ENTRIES_DIR
    from invarbench.leaderboard.tables import OUTPUT_DIR, build_tables

    output = tmp_path / "output"
    build_tables(ENTRIES_DIR, output)
    for built in [path for path in output.glob("*") if path.suffix in (".md", ".csv", ".tex", ".html")]:
        assert built.read_bytes() == (OUTPUT_DIR / built.name).read_bytes(), f"leaderboard/output/{built.name} is stale: run `invarbench leaderboard build --readme README.md`"
    blocks = re.findall(r"<!-- leaderboard:([A-Za-z0-9_.-]+) -->\n(.*?)<!-- /leaderboard:\1 -->", README.read_text(), flags=re.DOTALL)
    assert blocks, "README shows the generated leaderboard tables"
    for name, block in blocks:
        assert block == (output / f"{name}.md").read_text(), f"README's {name} table is stale: run `invarbench leaderboard build --readme README.md`"
