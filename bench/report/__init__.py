"""Reports on results: reading result.json files (results), statistics (stats), tables, the HTML page, plots,
the W&B leaderboard run and report (wandb_report), all driven by `bench leaderboard` (leaderboard); and a
trial's W&B run with its local metrics copy (tracking)."""
