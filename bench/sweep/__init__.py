"""Sweeps: the YAML search space (space), the Ray Tune driver (driver), AMT pool runs (amt_pool, pool) and the
validation-only merge search (merge_search)."""
