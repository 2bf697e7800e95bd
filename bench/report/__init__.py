"""Reports: reading results, statistics, tables, plots (leaderboard) and W&B runs (tracking)."""
