"""Argument checks with rebasin's wording, for code built on rebasin (``continual``, your own matchers).

Each returns the checked value and raises :class:`rebasin.RebasinError` naming the argument, what it must be
and what was given, e.g. ``n_iter must be an int >= 1, got 0``.

Examples
--------
>>> from rebasin.checks import check_int, check_number_in
>>> check_int(3, "epochs")
3
>>> check_number_in(0.5, "alpha", 0, 1)
0.5
"""

from __future__ import annotations

from ._common import check_float, check_int, check_number_in, check_positive

__all__ = ["check_int", "check_float", "check_positive", "check_number_in"]
