"""Sweeps: the YAML search space (space), the command and Tune run (driver), the functions Tune calls
(trainables), its callbacks (callbacks), trial folders (folders), the plan of a sweep whose trials need runs
first, e.g. AMT pools (phases), the finished sweep's results (results) and the validation-only merge search
(merge_search)."""
