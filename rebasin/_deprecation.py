"""Keyword names renamed in 0.2, and 0.2 spellings replaced in 0.3, that keep working for one release (any module may use it).

Only names that the documentation or the examples used get an alias here; the others were renamed outright.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["renamed_keywords", "deprecated_form", "deprecated_alias"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keywords(*, positional: tuple[str, ...] = (), **renames: str) -> Callable[[F], F]:
    """Decorator: 0.1 spellings of a call keep working for one release, each with a :class:`DeprecationWarning`.

    Parameters
    ----------
    positional
        The 0.1 positional parameters, when the call order changed: a call with exactly that many
        positional arguments is read with these names (for example ``("model", "loss_fn", "batch")``
        when ``loss_fn`` became a keyword argument).
    **renames
        ``old="new"``: the keyword ``old`` is passed on as ``new``.

    Giving a value twice (old and new name) is a :class:`TypeError`, as for any keyword given twice. The
    decorated function keeps its own signature (``inspect.signature`` follows ``__wrapped__``); a warning
    raised inside it reaches the caller with ``stacklevel=3``.
    """

    def decorate(func: F) -> F:
        name = func.__name__
        now = [p.name for p in inspect.signature(func).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        new_form = ", ".join(now + [f"{k}={k}" for k in positional if k not in now])

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if positional and len(args) == len(positional):
                twice = [k for k in positional if k in kwargs]
                if twice:
                    raise TypeError(f"{name}() got {twice} both positionally and as keywords")
                warnings.warn(
                    f"{name}({', '.join(positional)}) is deprecated and will be removed in the next release; "
                    f"use {name}({new_form})",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs.update(zip(positional, args))
                args = ()
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {old}= and its new name {new}=; pass {new}= only")
                    warnings.warn(
                        f"{name}({old}=...) is deprecated and will be removed in the next release; "
                        f"use {name}({new}=...)",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]  # functools.wraps keeps the wrapped function's signature

    return decorate


def deprecated_form(old: Callable[..., Any], *, when: Callable[..., bool], use: str) -> Callable[[F], F]:
    """Decorator: a 0.2 calling form of a function keeps working for one release, with a :class:`DeprecationWarning`.

    Parameters
    ----------
    old
        Implements the old form: called with the call's arguments when ``when(*args, **kwargs)`` is true.
    when
        Tells the old form from the new one by the arguments alone.
    use
        The new spelling, for the message.
    """

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if when(*args, **kwargs):
                warnings.warn(
                    f"this form of {func.__name__}() is deprecated and will be removed in the next release; use {use}",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return old(*args, **kwargs)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]  # functools.wraps keeps F's signature

    return decorate


def deprecated_alias(func: F, old_name: str, use: str) -> F:
    """``func`` under its 0.2 name ``old_name``: the same call, with a :class:`DeprecationWarning` naming ``use``."""

    @functools.wraps(func)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(
            f"{old_name} is deprecated and will be removed in the next release; use {use}",
            DeprecationWarning,
            stacklevel=2,
        )
        return func(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old_name
    return alias  # type: ignore[return-value]  # functools.wraps keeps the wrapped function's signature
