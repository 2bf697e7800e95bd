"""Method registry, in the style of timm's ``@register_model``.

A method module decorates its class with ``@register_method("name")``; ``bench`` looks methods up by
name, so adding a method never touches the CLI.
"""
from __future__ import annotations

_METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator: make ``cls`` available as ``get_method(name)``."""

    def wrap(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    # Importing the package registers every built-in method (methods/__init__.py imports them).
    import methods  # noqa: F401


def list_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> type:
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; valid: {', '.join(sorted(_METHODS))}") from None
