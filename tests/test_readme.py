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
