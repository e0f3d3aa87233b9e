"""invarbench.leaderboard: aggregation of stored results into tables, plots and a static page."""

from pathlib import Path

from invarbench.io import invarbench_home


def leaderboard_root(package: Path = Path(__file__).parent) -> Path:
    """Where entries, tables and the site live by default: this package's folder in a clone or an
    editable install (it holds the stored entries), else ``$INVARBENCH_HOME/leaderboard`` (default
    ``~/.cache/invarbench/leaderboard``): an installed wheel ships no entries and is not written into."""
    if (package / "entries").is_dir():
        return package
    return invarbench_home() / "leaderboard"


# Defined here, without heavy imports, so the CLI's parser can name them.
ENTRIES_DIR = leaderboard_root() / "entries"
OUTPUT_DIR = leaderboard_root() / "output"
SITE_DIR = leaderboard_root() / "site"
