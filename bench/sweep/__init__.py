"""Sweeps: the YAML search space (space), the command and Tune run (driver), the functions Tune calls
(trainables), its callbacks (callbacks), trial folders (folders), the finished sweep's results (results),
AMT pool runs (amt_pool, pool) and the validation-only merge search (merge_search)."""
