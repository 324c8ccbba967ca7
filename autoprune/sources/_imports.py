"""Import a user's ``some.module:function`` reference, with an error that says what failed."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from autoprune.errors import SourceError


def import_object(ref: str, field: str) -> Any:
    """Import ``package.module:attr`` (the current directory is importable, like ``python -m``).

    Args:
        ref: the reference, e.g. ``my_project.models:build``.
        field: the config key it came from, named in errors.
    """
    if ":" not in ref:
        raise SourceError(f"{field}: got {ref!r}; allowed: 'package.module:function'")
    module_name, _, attr = ref.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SourceError(
            f"{field}: cannot import module {module_name!r} from {ref!r} ({e}); allowed: a module "
            "importable from the current directory or the installed packages (run from the "
            "folder that holds it, or add that folder to PYTHONPATH)"
        ) from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SourceError(f"{field}: module {module_name!r} has no attribute {attr!r}"
                              f"{_what_it_has(module, attr)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SourceError(f"{field}: {ref!r} is not callable")
    return obj


def _what_it_has(module: Any, attr: str) -> str:
    """The module's own functions and classes (not what it imported), closest to ``attr``
    first: what a reference to it would name."""
    import difflib
    import inspect

    own = sorted(n for n, v in vars(module).items()
                 if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
                 and getattr(v, "__module__", None) == module.__name__)
    if not own:
        return " (it defines no functions or classes)"
    close = difflib.get_close_matches(attr, own, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(own[:30]) + (f", ... ({len(own)} in all)" if len(own) > 30 else "")
    return f"{hint}; it defines: {shown}"
