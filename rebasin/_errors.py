"""The exception and warning types of the toolkit."""

from __future__ import annotations

__all__ = ["RebasinError", "RebasinWarning"]


class RebasinError(ValueError):
    """Raised for every bad input the toolkit detects.

    It subclasses :class:`ValueError`, so ``except ValueError`` keeps working for callers
    that do not know about the toolkit. Messages name the state_dict key, the permutation
    and the shapes involved, and say what to change.
    """


class RebasinWarning(UserWarning):
    """Warned when a result is valid but probably not what was meant: a traced spec that leaves a weighted
    module's units unpermuted because no rule claimed its parameters, or an alignment with nothing to align."""
