"""invarbench.leaderboard: aggregation of stored results into tables, plots and a static page."""

from pathlib import Path

# Where the leaderboard lives (defined here, without heavy imports, so the CLI's parser can name them).
ENTRIES_DIR = Path(__file__).parent / "entries"
OUTPUT_DIR = Path(__file__).parent / "output"
SITE_DIR = Path(__file__).parent / "site"
