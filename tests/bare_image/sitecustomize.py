"""Imports as on the bare GPU image (tests/test_gpu_check.py puts this folder on PYTHONPATH): a module whose
distribution is neither one of BENCH_BARE_IMAGE (the image's packages, comma-separated) nor what they
depend on is not found (``import`` raises ModuleNotFoundError, ``importlib.util.find_spec`` gives None, as
for a package that is not installed), so a check that would need, say, Ray or W&B there fails here too."""
import importlib.machinery
import importlib.metadata as md
import os
import re
import sys


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names):
    seen, todo = set(), [_norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [_norm(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in requires if "extra ==" not in r]
    return seen


class _HiddenFromPathFinder:
    """sys.meta_path's PathFinder, blind to the blocked top-level packages."""

    def __init__(self, blocked):
        self.blocked = blocked

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(importlib.machinery.PathFinder, attr)


_allowed = os.environ.get("BENCH_BARE_IMAGE")
if _allowed:
    _ok = _closure(_allowed.split(",")) | {"pip", "setuptools", "wheel", "robust-lora-bench"}
    _blocked = {mod for mod, dists in md.packages_distributions().items()
                if not any(_norm(d) in _ok for d in dists)}
    sys.meta_path[:] = [_HiddenFromPathFinder(_blocked) if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
