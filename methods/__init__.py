"""Methods: one module per method, each a self-contained recipe registered with ``@register_method``.

Importing this package registers the built-in methods.
"""
from methods.registry import get_method, list_methods, register_method  # noqa: F401
from methods import baselines  # noqa: F401,E402  (registers rft, ft)

for _optional in ("autolora", "twins", "amt", "pmf"):
    try:  # a method module under construction must not break the others
        __import__(f"methods.{_optional}")
    except ModuleNotFoundError as e:
        if e.name != f"methods.{_optional}":
            raise
