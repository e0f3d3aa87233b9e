"""invarbench.leaderboard: aggregation of stored results into tables, plots and a static page."""
