"""The one exception type of the toolkit."""

from __future__ import annotations

__all__ = ["RebasinError"]


class RebasinError(ValueError):
    """Raised for every bad input the toolkit detects.

    It subclasses :class:`ValueError`, so ``except ValueError`` keeps working for callers
    that do not know about the toolkit. Messages name the state_dict key, the permutation
    and the shapes involved, and say what to change.
    """
