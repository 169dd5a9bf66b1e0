"""Resolving ``package.module:attribute`` strings (enrich hooks, plugins)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def import_callable(path: str) -> Callable[..., Any]:
    """The callable named by ``package.module:attribute``; raises ValueError saying why not."""
    module_name, _, attr = path.partition(":")
    if not _DOTTED.fullmatch(module_name) or not _DOTTED.fullmatch(attr):
        raise ValueError(f"{path!r} is not 'package.module:attribute'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise ValueError(f"cannot import {path!r}: {exc.__class__.__name__}: {exc}") from None
    if not callable(target):
        raise ValueError(f"{path!r} is not callable")
    return target  # type: ignore[no-any-return]
